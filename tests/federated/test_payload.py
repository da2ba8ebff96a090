"""The update gate: safetensors bytes round-trip exactly; bad updates are rejected with their reason."""
import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from safetensors.torch import save

from unipeft.federated.payload import changed, check_update, full_state, pack, payload_bytes, unpack

REF = {"m.lora_A.weight": torch.randn(4, 16), "m.lora_B.weight": torch.zeros(8, 4), "head.bias": torch.randn(8)}


def test_pack_round_trips_bit_for_bit():
    back = unpack(pack(REF))
    assert set(back) == set(REF)
    assert all(torch.equal(back[k], REF[k]) and back[k].dtype == REF[k].dtype for k in REF)
    assert payload_bytes(pack(REF)) == len(save(REF))


def test_changed_sends_only_what_training_touched():
    local = {k: v.clone() for k, v in REF.items()}
    local["m.lora_B.weight"] += 1
    assert list(changed(local, REF)) == ["m.lora_B.weight"]
    whole = full_state(changed(local, REF), REF)
    assert torch.equal(whole["m.lora_A.weight"], REF["m.lora_A.weight"]) and torch.equal(
        whole["m.lora_B.weight"], local["m.lora_B.weight"])


def _with(key, value):
    return pack({**REF, key: value})


@pytest.mark.parametrize("record,reason", [
    (_with("m.lora_B.weight", torch.full((8, 4), float("nan"))), "non-finite values in m.lora_B.weight"),
    (_with("head.bias", torch.tensor([float("inf")] * 8)), "non-finite values in head.bias"),
    (_with("m.lora_A.weight", torch.randn(4, 15)), "wrong shape for m.lora_A.weight"),
    (_with("head.bias", torch.randn(8, dtype=torch.float64)), "wrong shape for head.bias"),
    (_with("m.lora_C.weight", torch.randn(2)), "unknown keys"),
    (ArrayRecord({"adapter": Array(np.frombuffer(b"not safetensors", dtype=np.uint8).copy())}), "malformed"),
    (ArrayRecord({"weights": Array(np.zeros(3, dtype=np.float32))}), "malformed"),
])
def test_bad_updates_are_rejected_with_their_reason(record, reason):
    tensors, why = check_update(record, REF, max_bytes=10**6)
    assert tensors is None and why.startswith(reason), why


def test_oversized_update_is_rejected_before_decoding():
    record = pack(REF)
    size = payload_bytes(record)
    assert check_update(record, REF, size)[1] is None
    tensors, why = check_update(record, REF, size - 1)
    assert tensors is None and why == f"oversized update: {size} bytes > limit {size - 1}"


def test_compeft_updates_rebuild_global_plus_ternary_delta_and_bad_ones_are_refused():
    from unipeft.federated import compression
    big = {"m.lora_A.weight": torch.randn(8, 512), "m.lora_B.weight": torch.randn(512, 8), "head.bias": torch.randn(8)}
    local = {k: v + torch.randn_like(v) for k, v in big.items()}
    enc = compression.encode(local, big, density=0.25)
    assert payload_bytes(pack(enc)) < payload_bytes(pack(local)) / 12  # (1 + 0.25) bits vs 32 per entry
    got, why = check_update(pack(enc), big, 10**6, compression.decode)
    assert why is None
    for k in big:
        d = (got[k] - big[k]).flatten()
        kept = d != 0
        assert int(kept.sum()) == max(1, round(0.25 * d.numel()))  # the top quarter of |local - global|
        true = (local[k] - big[k]).flatten()
        assert true[kept].abs().min() >= true[~kept].abs().max()
        assert torch.equal(torch.sign(d[kept]), torch.sign(true[kept]))
        assert torch.allclose(d[kept].abs(), true[kept].abs().mean().expand(int(kept.sum())), atol=1e-5)
    bad = dict(enc)
    bad["head.bias::scale"] = torch.tensor([float("nan")])
    assert check_update(pack(bad), big, 10**6, compression.decode)[1] == "non-finite values in head.bias::scale"
    short = {**enc, "m.lora_A.weight::mask": enc["m.lora_A.weight::mask"][:-1]}
    assert check_update(pack(short), big, 10**6, compression.decode)[1].startswith("wrong shape for m.lora_A")
    del bad["head.bias::signs"]
    assert check_update(pack(bad), big, 10**6, compression.decode)[1].startswith("malformed payload: head.bias")
