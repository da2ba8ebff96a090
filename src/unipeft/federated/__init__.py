"""Federated training of adapters on Flower: ServerApp/ClientApp, aggregation rules, client splits."""
from .config import FederatedConfig, federated_config_from_dict, load_federated_config  # noqa: F401

__all__ = ["FederatedConfig", "federated_config_from_dict", "load_federated_config", "run_federated"]


def run_federated(*args, **kwargs):
    """See simulate.run_federated (imported lazily: Flower loads only when a federated run starts)."""
    from .simulate import run_federated as run
    return run(*args, **kwargs)
