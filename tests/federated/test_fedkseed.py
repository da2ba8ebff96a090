"""FedKSeed: a client's K scalars rebuild its trained adapter exactly from theta_0, on any node."""
import torch
from torch import nn

from unipeft.federated.fedkseed import build_kseed, candidate_seeds, fingerprint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    m[0].weight.requires_grad_(False)  # a frozen tensor: no direction, never changed
    return m


def test_coefficients_replay_the_local_training_exactly():
    pool = candidate_seeds(16, run_seed=7)
    assert len(set(pool)) == 16 and pool == candidate_seeds(16, run_seed=7)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    trained = _model()
    theta0 = fingerprint(dict(trained.state_dict()))
    opt = build_kseed(trained, lr=0.05, eps=1e-3, pool=pool, choice_seed=1)
    losses = [float(opt.step(lambda: nn.functional.cross_entropy(trained(x), y))) for _ in range(40)]
    assert losses[-1] < losses[0]  # it learns
    c = opt.coefficients
    assert 0 < int(torch.count_nonzero(c)) <= 16 and c.numel() * 4 == 64  # what travels: K float32 numbers
    other = _model()  # another node: the same theta_0 from the same seed
    assert fingerprint(dict(other.state_dict())) == theta0
    build_kseed(other, lr=0.0, eps=1e-3, pool=pool).replay(c)
    for (name, p), q in zip(trained.named_parameters(), other.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert torch.equal(trained[0].weight, _model()[0].weight)
