"""Checkpoints, exact --resume, and the atomic run folder (a crashed run never looks complete)."""
from __future__ import annotations

import json

import pytest
import torch

from unipeft.core.errors import ConfigError
from unipeft.train import config_from_dict, partial_dir, train_run
from unipeft.train.artifacts import load_run

from ._helpers import Crash, adapter_tensors, crash_at, tiny_config




def _cfg(tiny_bert, word_csv, out, **extra):
    # LoRA dropout > 0 makes the result depend on the RNG stream, so an exact resume must restore it;
    # weight decay and warm-up + linear decay make it depend on optimizer and scheduler state too.
    base = dict(method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["query", "value"]},
                optimizer={"weight_decay": 0.1}, schedule={"name": "linear", "warmup_steps": 3},
                save_every=4, keep_checkpoints=2, eval_every=5)
    base.update(extra)
    return config_from_dict(tiny_config(tiny_bert, word_csv, out, **base))


def _train(cfg, **kwargs):
    return train_run(cfg, show_progress=False, log=lambda *_: None, **kwargs)


def _records(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # the one timing field


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, word_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    _train(_cfg(tiny_bert, word_csv, out))
    return out


@pytest.mark.parametrize("stop", [6, 10])  # mid-epoch (checkpoint at step 4), and right after an epoch end
def test_interrupted_then_resumed_equals_uninterrupted(tiny_bert, word_csv, tmp_path, uninterrupted, stop):
    out = tmp_path / "run"
    cfg = _cfg(tiny_bert, word_csv, out)
    with pytest.raises(Crash):
        _train(cfg, callbacks=[crash_at(stop)])
    part = partial_dir(out)
    assert not out.exists() and part.is_dir()  # crashed: resumable, and never looks complete
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ({6: ["step-0000004"], 10: ["step-0000004", "step-0000008"]}[stop])
    with pytest.raises(ConfigError, match="is not a finished unipeft run.*holds an unfinished run.*--resume"):
        load_run(out)
    summary = _train(cfg, resume=True)
    assert summary["resumed"] and summary["steps"] == 15 and not part.exists()
    ref, got = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # bit-exact: same data order, RNG, optimizer and schedule state
    assert _records(out) == _records(uninterrupted)
    assert not (out / "checkpoints").exists()


def test_resume_refuses_a_changed_config_or_no_checkpoint(tiny_bert, word_csv, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        _train(_cfg(tiny_bert, word_csv, out), callbacks=[crash_at(5)])
    with pytest.raises(ConfigError, match=r"config differs from the interrupted run's in \['optimizer'\]"):
        _train(_cfg(tiny_bert, word_csv, out, optimizer={"lr": 0.1}), resume=True)
    with pytest.raises(ConfigError, match="holds an interrupted run; pass --resume"):
        _train(_cfg(tiny_bert, word_csv, out))
    with pytest.raises(ConfigError, match="--resume: no checkpoint"):
        _train(_cfg(tiny_bert, word_csv, tmp_path / "other"), resume=True)


def test_crash_before_first_checkpoint_leaves_nothing(tiny_bert, word_csv, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        _train(_cfg(tiny_bert, word_csv, out), callbacks=[crash_at(2)])
    assert list(tmp_path.iterdir()) == []


def test_crash_while_writing_the_result_never_looks_complete(tiny_bert, word_csv, tmp_path, monkeypatch):
    import unipeft.train.run as run_mod

    def broken_save(parts, model, run_dir):
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_config.json").write_text("{")  # half-written
        raise OSError("disk full")

    monkeypatch.setattr(run_mod, "_save_final", broken_save)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        _train(_cfg(tiny_bert, word_csv, out, save_every=None))
    assert list(tmp_path.iterdir()) == []  # no checkpoint to resume from: nothing kept
    with pytest.raises(OSError, match="disk full"):
        _train(_cfg(tiny_bert, word_csv, out))
    assert not out.exists() and (partial_dir(out) / "checkpoints").is_dir()  # resumable, not complete
    monkeypatch.undo()
    assert _train(_cfg(tiny_bert, word_csv, out), resume=True)["status"] == "complete"
    assert (out / "summary.json").is_file() and not partial_dir(out).exists()


def test_overwrite_replaces_only_when_the_new_run_finishes(tiny_bert, word_csv, tmp_path, uninterrupted):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    before = (out / "summary.json").read_text()
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        _train(_cfg(tiny_bert, word_csv, out))
    with pytest.raises(Crash):
        _train(_cfg(tiny_bert, word_csv, out, max_steps=6), overwrite=True, callbacks=[crash_at(5)])
    assert (out / "summary.json").read_text() == before  # the old run is intact after the crash
    with pytest.raises(ConfigError, match="add --overwrite"):
        _train(_cfg(tiny_bert, word_csv, out, max_steps=6), resume=True)
    assert _train(_cfg(tiny_bert, word_csv, out, max_steps=6), resume=True, overwrite=True)["steps"] == 6
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
