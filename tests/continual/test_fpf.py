"""FPF changes only the selected modules (a temporary adapter merged back; or an adapter's sites)."""
import pytest
import torch
from torch import nn

import unipeft as up
from unipeft.continual import ContinualError, FPFConfig, fpf_finetune
from unipeft.core.site import AdaptedSite

from .helpers import changed, filled_buffer, image_stream, snapshot, tiny_cnn

SELECTED = ["fc", "bn2", "conv1"]


def _expected_keys(model: nn.Module, modules: list[str], mode: str) -> set[str]:
    keys = {k for k in model.state_dict() if k.rsplit(".", 1)[0] in modules and "num_batches" not in k}
    # LoRA trains the weight of a conv/linear layer, not its bias; BatchNorm gets a full copy
    return {k for k in keys if mode == "full" or k.startswith("bn") or k.endswith(".weight")}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_only_selected_modules_change_on_a_plain_model(mode):
    stream = image_stream()
    model = tiny_cnn()
    model.train()
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fpf_finetune(model, filled_buffer(stream), SELECTED, stream, FPFConfig(steps=5, lr=0.1, batch_size=8, mode=mode))
    moved = changed(before, model)
    # every parameter and BatchNorm statistic of the selected modules moved; nothing else (bit-identical)
    assert {k for k in moved if "num_batches" not in k} == _expected_keys(model, SELECTED, mode)
    assert all(k.startswith("bn2.") for k in moved if "num_batches" in k)
    # the temporary adapter is gone and the model is as it was otherwise
    assert not any(isinstance(m, AdaptedSite) for m in model.modules()) and model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_only_selected_sites_change_on_an_adapted_model():
    stream = image_stream()
    model = up.adapt(tiny_cnn(), up.LoraConfig(r=2, target_modules=["conv2", "conv3", "fc"],
                                               modules_to_save=["bn2"]))
    with torch.no_grad():  # non-zero B, so that every LoRA factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    before = snapshot(model)
    fpf_finetune(model, filled_buffer(stream), ["conv3", "bn2"], stream, FPFConfig(steps=4, lr=0.1, batch_size=8))
    moved = {k for k in changed(before, model) if "running" not in k and "num_batches" not in k}
    assert moved and all(("conv3" in k and "lora_" in k) or "bn2.deltas" in k for k in moved), moved
    assert any("conv3" in k for k in moved) and any("bn2" in k for k in moved)
    # flags restored: the adapter stays trainable everywhere
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_kd_loss_uses_the_stored_logits():
    stream = image_stream()
    models = [tiny_cnn(), tiny_cnn()]
    buf = filled_buffer(stream, logits=True)
    fpf_finetune(models[0], buf, ["fc"], stream, FPFConfig(steps=3, batch_size=8, loss="ce"))
    fpf_finetune(models[1], buf, ["fc"], stream, FPFConfig(steps=3, batch_size=8, loss="kd"))
    assert not torch.equal(models[0].fc.weight, models[1].fc.weight)
    with pytest.raises(ContinualError, match="logits"):
        fpf_finetune(tiny_cnn(), filled_buffer(stream), ["fc"], stream, FPFConfig(steps=1, loss="kd"))


def test_bad_input_leaves_the_model_unchanged():
    stream = image_stream()
    model = tiny_cnn()
    before = snapshot(model)
    with pytest.raises(ContinualError, match="no module"):
        fpf_finetune(model, filled_buffer(stream), ["fc", "nope"], stream)
    with pytest.raises(ContinualError, match="budget"):
        fpf_finetune(model, filled_buffer(stream), ["fc"], stream, FPFConfig(budget=1.5))
    assert not changed(before, model) and not any(isinstance(m, AdaptedSite) for m in model.modules())
