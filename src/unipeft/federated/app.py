"""The Flower App for the deployment engine (`flwr run`): components named in examples/flower_app/pyproject.toml.

The SuperLink runs `server_app`, every SuperNode `client_app`; both read the federated YAML named by the
run config key `config` (and `overrides`, a space-separated `--key value` string), and a SuperNode's part
of the data from its `--node-config "partition-id=K num-partitions=N"`.
"""
from .client import make_client_app
from .server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
