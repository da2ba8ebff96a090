"""FSDP: the frozen base and the adapter sharded over 2 CPU processes (torch FSDP2 over gloo).

Two FSDP processes give the adapter of one process (to float summation order), each holds
about half of the frozen base during the run, a checkpoint written mid-run resumes to the
uninterrupted adapter (on 2 FSDP processes and on 1 plain one: the format is the same), and
launches or methods that cannot run this way are refused with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import yaml

from unipeft.core.errors import ConfigError
from unipeft.train import config_from_dict, partial_dir, train_run

from ._helpers import adapter_tensors, summary, tiny_config, write_config

# Gradients are reduce-scattered (a different float summation order than one process).
TOLERANCE = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# What `accelerate launch --use_fsdp --fsdp_version 2` exports (it launches through torchrun, too).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
# Weight decay and a warm-up make the result depend on optimizer and scheduler state (for resume).
# 15 valid/test rows in batches of 7: process 0 runs 2 forwards, process 1 one real one + one in lockstep.
COMMON = dict(max_steps=6, eval_every=3, save_every=3, log_every=1, eval_batch_size=7,
              optimizer={"weight_decay": 0.1}, schedule={"name": "linear", "warmup_steps": 2})

DRIVER = textwrap.dedent('''
    """train_run in each process of a launch; records what each process holds after step 2, may crash."""
    import json, sys
    from pathlib import Path
    from unipeft.train import TrainerCallback, load_config, train_run
    from unipeft.train.fsdp import local_sizes

    config, probe_dir, crash_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

    class Probe(TrainerCallback):
        def on_step_end(self, ctx):
            if ctx.step == 2:
                (probe_dir / f"rank-{ctx.rank}.json").write_text(json.dumps(local_sizes(ctx.model)))
            if ctx.step == crash_at:
                raise SystemExit(f"interrupted after step {ctx.step}")

    train_run(load_config(config), show_progress=False, callbacks=[Probe()])
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """2 processes under torchrun with accelerate's FSDP environment."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], env={**ENV, **FSDP_ENV}, capture_output=True, text=True, timeout=300)


def _accelerate_launch(*args: str) -> subprocess.CompletedProcess:
    """The README's command: accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m unipeft.cli train."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
                           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                           "-m", "unipeft.cli", "train", *args, "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=300)


def _losses(run_dir, key="loss"):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if "split" not in r]


def _assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=TOLERANCE, rtol=0, msg=k)


@pytest.fixture(scope="module")
def runs(tiny_bert, word_csv, tmp_path_factory):
    """One uninterrupted 2-process FSDP run (global batch 8 = 2 processes x 2 micro-batches of 2) and 1 process."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "driver.py").write_text(DRIVER)
    (root / "probe").mkdir()
    two = tiny_config(tiny_bert, word_csv, root / "two", grad_accum=2, **COMMON)
    proc = _torchrun(str(root / "driver.py"), str(write_config(root / "two.yaml", **two)), str(root / "probe"), "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_run(config_from_dict(tiny_config(tiny_bert, word_csv, root / "one", **COMMON)), show_progress=False,
              log=lambda *_: None)
    return SimpleNamespace(root=root, one=root / "one", two=root / "two", two_cfg=two, log=proc.stdout)


@pytest.mark.slow
def test_two_fsdp_processes_give_the_adapter_of_one(runs):
    s1, s2 = summary(runs.one), summary(runs.two)
    assert (s1["world_size"], s2["world_size"], s2["backend"], s2["strategy"]) == (1, 2, "gloo", "fsdp")
    assert runs.log.count("FSDP over 2 processes") == 1  # only the main process logs
    a, b = adapter_tensors(runs.one), adapter_tensors(runs.two)
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-2  # moved beyond the tolerance
    _assert_same_adapter(a, b)
    # the same on-disk format: PEFT's config and key names, written once by the main process
    assert (runs.one / "adapter" / "adapter_config.json").read_text() == \
        (runs.two / "adapter" / "adapter_config.json").read_text()
    for key in ("loss", "grad_norm"):  # the global batch's loss; the norm over every shard of every process
        torch.testing.assert_close(torch.tensor(_losses(runs.one, key)), torch.tensor(_losses(runs.two, key)),
                                   atol=1e-5, rtol=0)
    assert s2["test"]["accuracy"] == s1["test"]["accuracy"] and s2["test"]["examples"] == 15


@pytest.mark.slow
def test_each_process_holds_half_of_the_frozen_base(runs):
    whole = summary(runs.one)["parameters_per_process"][0]
    s2 = summary(runs.two)
    assert s2["fsdp"]["units"] == ["BertLayer", "BertLayer", "root"]  # embeddings stay in the root unit
    assert s2["fsdp"]["whole_model"] == whole
    probed = [json.loads((runs.root / "probe" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for per_rank in (s2["parameters_per_process"], probed):  # after sharding, and after 2 optimizer steps
        for kind in ("frozen", "frozen_bytes", "trainable", "trainable_bytes"):
            assert sum(r[kind] for r in per_rank) == whole[kind], kind  # a partition: nothing held twice
        for r in per_rank:
            assert abs(r["frozen"] - whole["frozen"] / 2) <= 0.01 * whole["frozen"], (r, whole)
    assert whole["frozen"] > 900_000 and whole["trainable"] < 2_000  # the base is what is worth sharding


@pytest.mark.slow
def test_checkpoint_resumes_to_the_uninterrupted_adapter(runs):
    out = runs.root / "resumed"
    cfg = {**runs.two_cfg, "output_dir": str(out)}
    config = write_config(runs.root / "resumed.yaml", **cfg)
    crashed = _torchrun(str(runs.root / "driver.py"), str(config), str(runs.root / "probe"), "5")
    assert crashed.returncode != 0 and "interrupted after step 5" in crashed.stderr
    part = partial_dir(out)
    assert not out.exists() and [p.name for p in (part / "checkpoints").iterdir()] == ["step-0000003"]

    # the checkpoint holds whole tensors: one plain process resumes it as well (config.yaml names its folder)
    single = runs.root / "single"
    shutil.copytree(part, partial_dir(single))
    saved = yaml.safe_load((partial_dir(single) / "config.yaml").read_text())
    (partial_dir(single) / "config.yaml").write_text(yaml.safe_dump({**saved, "output_dir": str(single)},
                                                                    sort_keys=False))
    s = train_run(config_from_dict({**cfg, "output_dir": str(single)}), resume=True, show_progress=False,
                  log=lambda *_: None)
    assert s["resumed"] and s["world_size"] == 1
    _assert_same_adapter(adapter_tensors(runs.one), adapter_tensors(single))

    resumed = _accelerate_launch(str(config), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-0000003 (step 3 of 6)" in resumed.stdout
    s2 = summary(out)
    assert s2["resumed"] and s2["strategy"] == "fsdp" and s2["steps"] == 6 and not part.exists()
    _assert_same_adapter(adapter_tensors(runs.two), adapter_tensors(out))
    assert _losses(out) == pytest.approx(_losses(runs.two), abs=1e-6)


@pytest.mark.slow
def test_a_method_with_training_callbacks_is_refused_in_an_fsdp_launch(tiny_bert, word_csv, tmp_path):
    cfg = tiny_config(tiny_bert, word_csv, tmp_path / "sara", max_steps=2,
                      method={"name": "sara", "ratio": 0.1, "target_modules": ["query", "value"]})
    proc = _accelerate_launch(str(write_config(tmp_path / "sara.yaml", **cfg)))
    assert proc.returncode != 0
    assert "method 'sara' with FSDP: its training callbacks (SaraCallback)" in proc.stderr
    assert "train it with DDP" in proc.stderr
    assert not (tmp_path / "sara").exists() and not partial_dir(tmp_path / "sara").exists()


# ---- refusals that need no launch ------------------------------------------------------------------
def _run(cfg):
    return train_run(config_from_dict(cfg), show_progress=False, log=lambda *_: None)


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"},
     r"DeepSpeed launches are refused \(ACCELERATE_USE_DEEPSPEED=true.*" + ("" if torch.cuda.is_available() else
       r"runs on CUDA GPUs and this machine has none.*") + r"use FSDP: accelerate launch --use_fsdp"),
    ({"ACCELERATE_USE_FSDP": "true"}, r"FSDP_VERSION=1 .*pass --fsdp_version 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
     r"FSDP_OFFLOAD_PARAMS=true \(--fsdp_offload_params\): not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"},
     r"set `gradient_checkpointing: true` in the run config instead"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"},
     r"FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, r"this run has 1 process; launch 2 or more"),
])
def test_launches_that_cannot_run_are_refused(tiny_bert, word_csv, tmp_path, monkeypatch, env, message):
    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        _run(tiny_config(tiny_bert, word_csv, tmp_path / "run"))
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_strategy_key_conflicts_and_single_process(tiny_bert, word_csv, tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    with pytest.raises(ConfigError, match=r"FSDP \(distributed.strategy: fsdp, or an FSDP launch\).*1 process"):
        _run(tiny_config(tiny_bert, word_csv, tmp_path / "run", distributed={"strategy": "fsdp"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"distributed.strategy is 'ddp' but the launch asks for FSDP"):
        _run(tiny_config(tiny_bert, word_csv, tmp_path / "run", distributed={"strategy": "ddp"}))
    with pytest.raises(ConfigError, match=r"distributed.strategy: expected one of 'auto', 'ddp', 'fsdp'"):
        config_from_dict(tiny_config(tiny_bert, word_csv, tmp_path / "run", distributed={"strategy": "zero3"}))
    assert list(tmp_path.iterdir()) == []


def test_methods_and_wrap_classes_fsdp_cannot_run_are_refused(tiny_bert, word_csv, tmp_path):
    from unipeft.train.fsdp import FsdpOptions, _wrap_targets, check_method
    from unipeft.train.setup import build_parts

    sara = build_parts(config_from_dict(tiny_config(tiny_bert, word_csv, tmp_path / "run", method={
        "name": "sara", "ratio": 0.1, "target_modules": ["query", "value"]})))
    with pytest.raises(ConfigError, match=r"method 'sara' with FSDP: its training callbacks \(SaraCallback\)"):
        check_method(sara.model, "sara")
    lora = build_parts(config_from_dict(tiny_config(tiny_bert, word_csv, tmp_path / "run")))
    check_method(lora.model, "lora")  # no callbacks: runs
    units = _wrap_targets(lora.model, FsdpOptions())
    assert [type(m).__name__ for m in units] == ["BertLayer", "BertLayer"]  # innermost first; no embeddings
    with pytest.raises(ConfigError, match=r"FSDP_TRANSFORMER_CLS_TO_WRAP .* names \['LlamaDecoderLayer'\]"):
        _wrap_targets(lora.model, FsdpOptions(wrap_classes=("LlamaDecoderLayer",)))
