"""`unipeft search` as real processes on one SQLite study: a search killed with SIGKILL resumes (its running
trial is failed by the heartbeat check and retried), and `--workers 2` shares the budget between processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from unipeft.cli import main

from ._helpers import budget_count, load, states, write_config

SEARCH = {"sampler": "random", "seed": 0, "pruner": "none", "budget": {"max_steps": 150, "eval_every": 50},
          "space": {"method": {"lora": {"r": [1, 2, 4]}}, "optimizer.lr": {"low": 1.0e-3, "high": 1.0e-1,
                                                                           "log": True}}}


def _search(path, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "unipeft", "search", str(path), "--quiet", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _trials(tmp_path):
    try:
        return load(tmp_path).get_trials(deepcopy=False)
    except (KeyError, Exception):  # no database or study yet
        return []


@pytest.mark.slow
def test_a_killed_search_resumes_and_retries_its_running_trial(tmp_path):
    path = write_config(tmp_path, {"trials": 4, **SEARCH})
    proc = _search(path, "--search.heartbeat", "1")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            trials = _trials(tmp_path)
            done = [t for t in trials if t.state.name == "COMPLETE"]
            running = [t for t in trials if t.state.name == "RUNNING"]
            if done and running and running[0].number > done[0].number and len(running[0].params) == 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("no trial finished within 180 s")
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    killed = [t for t in load(tmp_path).trials if t.state.name == "RUNNING"]
    assert len(killed) == 1 and len(killed[0].params) == 2  # killed while training
    killed = killed[0]
    before = len(load(tmp_path).trials)
    assert before < 4

    started = time.monotonic()
    assert main(["search", str(path), "--quiet", "--search.heartbeat", "1"]) == 0
    study = load(tmp_path)
    assert budget_count(study) == 4 and "RUNNING" not in states(study)
    failed = study.trials[killed.number]
    assert failed.state.name == "FAIL" and "error" not in failed.user_attrs  # failed by the heartbeat check
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == killed.params  # the same parameters, run again
    assert retry[0].number >= before and retry[0].user_attrs["pid"] == os.getpid()
    assert sorted(int(s) for s in retry[0].user_attrs["intermediate"]) == [50, 100, 150]
    assert states(study) == {"COMPLETE": 4, "FAIL": 1}
    # the killed trial is stale 3 heartbeats (3 s) after its last beat, not earlier
    assert time.monotonic() - started >= 2.0


@pytest.mark.slow
def test_two_workers_share_one_study_and_its_budget(tmp_path):
    # trials long enough that the started worker (which first imports torch and the method registry, several
    # seconds on a busy machine) joins before this process has used up the budget alone
    path = write_config(tmp_path, {"trials": 8, **SEARCH, "budget": {"max_steps": 500, "eval_every": 250}})
    proc = _search(path, "--workers", "2")
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    study = load(tmp_path)
    assert budget_count(study) == 8 and "RUNNING" not in states(study)
    ran = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(ran) == 8
    # a surplus trial (two workers asking for the last trial at once) fails without `error`: not counted
    extra = [t for t in study.trials if t.state.name != "COMPLETE"]
    assert len(extra) <= 1 and all(t.state.name == "FAIL" and "surplus" in t.user_attrs for t in extra)
    from unipeft.search.report import trial_rows
    assert sorted(r["state"] for r in trial_rows(study)) == ["COMPLETE"] * 8 + ["SURPLUS"] * len(extra)
    pids = {t.user_attrs["pid"] for t in ran}
    assert len(pids) == 2 and proc.pid in pids  # the command's own process and the worker it started
    by = {p: [(t.datetime_start, t.datetime_complete) for t in ran if t.user_attrs["pid"] == p] for p in pids}
    a, b = by.values()
    assert any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)  # they ran at the same time
    assert sorted(p.name for p in (tmp_path / "out").glob("trial-*")) == [f"trial-{t.number:04d}" for t in ran]
    assert "Trials: 8 complete" in out
