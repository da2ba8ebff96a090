"""PEFT parity of the prompt methods: same weights -> same outputs; each loads the other's saved folder."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import unipeft as up

from ._models import build

TOL = dict(atol=1e-5, rtol=1e-5)
N = 4

CASES = {
    "bert-prompt-tuning": ("bert", "SEQ_CLS", lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N)),
    "gpt2-prompt-tuning": ("gpt2", "CAUSAL_LM", lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N)),
    "llama-prompt-tuning": ("llama", "CAUSAL_LM",
                            lambda t: peft.PromptTuningConfig(task_type=t, num_virtual_tokens=N)),
    "bert-prefix": ("bert", "SEQ_CLS", lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "gpt2-prefix": ("gpt2", "CAUSAL_LM", lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "llama-prefix-gqa": ("llama", "CAUSAL_LM", lambda t: peft.PrefixTuningConfig(task_type=t, num_virtual_tokens=N)),
    "gpt2-p-tuning": ("gpt2", "CAUSAL_LM", lambda t: peft.PromptEncoderConfig(task_type=t, num_virtual_tokens=N,
                                                                               encoder_hidden_size=8)),
    "gpt2-prefix-projection": ("gpt2", "CAUSAL_LM", lambda t: peft.PrefixTuningConfig(
        task_type=t, num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=8)),
}


def _batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, -2:] = 0  # a padded row: the extended mask must keep it masked
    return {"input_ids": ids, "attention_mask": mask}


def _peft_logits(model, batch, task: str) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch).logits
    # PEFT returns the virtual positions of prompt tuning too; unipeft only the input positions.
    return logits[:, -batch["input_ids"].shape[1]:] if task == "CAUSAL_LM" else logits


def _ours(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _trained_peft(kind: str, task: str, make):
    """A PEFT adapter with every tensor moved off its init (so equality shows all of them are used)."""
    model = peft.get_peft_model(build(kind), make(task))
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_folder_loads_with_identical_outputs(case, tmp_path):
    kind, task, make = CASES[case]
    theirs = _trained_peft(kind, task, make)
    batch = _batch()
    expected = _peft_logits(theirs, batch, task)
    theirs.save_pretrained(tmp_path)
    ours = up.AdaptedModel.from_pretrained(build(kind), tmp_path)
    got = _ours(ours, batch)
    torch.testing.assert_close(got, expected, **TOL)
    with ours.disable_adapters():
        torch.testing.assert_close(_ours(ours, batch), _ours(build(kind), batch), rtol=0, atol=0)
    assert (got - _ours(build(kind), batch)).abs().max() > 1e-3, "the loaded prompt does nothing"


OURS = {"prompt-tuning": lambda: up.PromptTuningConfig(num_virtual_tokens=N),
        "prefix": lambda: up.PrefixTuningConfig(num_virtual_tokens=N),
        "prefix-gqa": lambda: up.PrefixTuningConfig(num_virtual_tokens=N),
        "p-tuning": lambda: up.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=8),
        "prefix-projection": lambda: up.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True,
                                                           encoder_hidden_size=8)}


@pytest.mark.parametrize("case", ["bert-prompt-tuning", "gpt2-prompt-tuning", "bert-prefix", "gpt2-prefix",
                                  "llama-prefix-gqa", "gpt2-p-tuning", "gpt2-prefix-projection"])
def test_peft_loads_our_folder_with_identical_outputs(case, tmp_path):
    kind, task, make = CASES[case]
    peft_cfg = make(task)
    cfg = OURS[case.split("-", 1)[1]]().replace(task_type=task,
                                                modules_to_save=["classifier"] if task == "SEQ_CLS" else None)
    ours = up.adapt(build(kind), cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = _batch()
    expected = _ours(ours, batch)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_cfg.peft_type.value
    assert "prompt_embeddings" in load_file(str(tmp_path / "adapter_model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing/unexpected-key warning from PEFT
        theirs = peft.PeftModel.from_pretrained(build(kind), tmp_path).eval()
    got = _peft_logits(theirs, batch, task)
    torch.testing.assert_close(got, expected, **TOL)
    assert (got - _ours(build(kind), batch)).abs().max() > 1e-3, "the adapter does nothing"


@pytest.mark.parametrize("case", ["bert-prompt-tuning", "gpt2-prompt-tuning", "gpt2-prefix"])
def test_same_weights_same_outputs_and_gradients(case):
    """Our adapter given PEFT's tensors computes what PEFT computes, gradients included."""
    kind, task, make = CASES[case]
    theirs = _trained_peft(kind, task, make).train()
    cls = up.PromptTuningConfig if "prompt" in case else up.PrefixTuningConfig
    ours = up.adapt(build(kind), cls(task_type=task, num_virtual_tokens=N,
                                     modules_to_save=["classifier"] if task == "SEQ_CLS" else None))
    state = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    from unipeft.core.state import load_tensors
    load_tensors(ours, "default", state)
    ours.train()
    batch = _batch()
    torch.manual_seed(0)
    their_out = theirs(**batch).logits
    torch.manual_seed(0)
    our_out = ours(**batch).logits
    if task == "CAUSAL_LM" and "prompt" in case:
        their_out = their_out[:, N:]
    # Dropout is active in train mode: the same seed gives the same masks only if the computations match.
    torch.testing.assert_close(our_out, their_out, **TOL)
    (their_out ** 2).mean().backward()
    (our_out ** 2).mean().backward()
    their_grad = next(p.grad for n, p in theirs.named_parameters() if "prompt_encoder" in n and "embedding" in n)
    our_grad = next(p.grad for n, p in ours.named_parameters()
                    if p.requires_grad and n.endswith(("prompt_embeddings", "embedding.weight")))
    assert their_grad.abs().max() > 0
    torch.testing.assert_close(our_grad, their_grad, **TOL)


def test_token_labels_are_shifted_past_the_virtual_tokens():
    """Causal-LM loss with labels equals PEFT's (which pads labels with -100 for the prompt)."""
    kind, task, make = CASES["gpt2-prompt-tuning"]
    theirs = _trained_peft(kind, task, make)
    batch = _batch()
    labels = batch["input_ids"].clone()
    ours = up.AdaptedModel.from_pretrained(build(kind), _save(theirs))
    with torch.no_grad():
        lt = theirs(**batch, labels=labels).loss
        lo = ours(**batch, labels=labels).loss
    torch.testing.assert_close(lo, lt, **TOL)


def _save(model):
    import tempfile
    path = tempfile.mkdtemp()
    model.save_pretrained(path)
    return path
