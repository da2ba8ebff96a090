"""Seq-Fortunes pieces on the real MiniLM: the top-layer shortcut is the full encoder; FPF on its adapter."""
import pytest
import torch

from unipeft import continual as cl
from unipeft.continual import fortunes as f

from .helpers import changed, snapshot

pytestmark = pytest.mark.slow

TEXTS = ["The computer crashed again after the update.", "Bake the bread for forty minutes.",
         "The court ruled the contract void.", "She loved him more than words could say.",
         "Reboot the server and check the logs.", "Add salt and pepper to the soup.",
         "The judge dismissed the appeal.", "Love is patient, love is kind."]


@pytest.fixture(scope="module")
def encoded():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(f.minilm_dir())
    enc = tok(TEXTS, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def test_top_layers_on_cached_states_equal_the_full_encoder(encoded):
    ids, mask = encoded
    model = f.TopLayersClassifier(f.minilm_encoder(), 1, num_classes=4).eval()
    with torch.no_grad():
        full = f.minilm_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model.classifier(f.mean_pool(full, mask))
        got = model(f.lower_states(ids, mask, top_layers=1), mask)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_fpf_and_er_on_the_adapted_minilm(encoded):
    ids, mask = encoded
    data = cl.TensorData((f.lower_states(ids, mask, top_layers=1), mask), torch.tensor([0, 1, 2, 3] * 2))
    stream = cl.split_by_classes(data, data, 2)
    model = f.minilm_classifier(4, seed=0, r=2, top_layers=1)
    cfg = cl.CLConfig(epochs=1, batch_size=4, lr=0.05, buffer_size=4, progress=False,
                      fpf=cl.FPFConfig(steps=3, batch_size=4, budget=0.2))
    res = cl.run_continual(model, stream, "er+fpf", cfg)
    assert res.drift.selected and all(r["module"] in {s.path for s in model.sites()} for r in res.drift.rows)
    # FPF on two sites of the trained adapter: only their adapter tensors move
    buf = cl.ReservoirBuffer(8)
    buf.add(data.inputs, data.labels, stream.task_ids(data.labels))
    before = snapshot(model)
    cl.fpf_finetune(model, buf, ["classifier", "layers.0.output.dense"], stream, cl.FPFConfig(steps=2, lr=0.1))
    moved = changed(before, model)
    assert moved and all(k.startswith(("base_model.classifier.deltas", "base_model.layers.0.output.dense.deltas"))
                         for k in moved), moved
    assert any("classifier" in k for k in moved) and any("output.dense" in k for k in moved)
