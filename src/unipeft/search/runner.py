"""`run_search`: trials of the project's trainer in an Optuna study on a database, by K worker processes.

Each trial samples the space, builds its run config (an invalid combination fails that trial with the
error), trains it with `train_run` into `<output_dir>/trial-NNNN/` and tells the study its objectives. A
pruned trial is told PRUNED, a failing one FAIL with its error in the `error` user attribute; the study
goes on. The study lives in `--storage` (default sqlite:///<output_dir>/study.db) with Optuna's heartbeat:
a trial whose process was killed stops beating and is failed and retried with the same parameters
(RetryHeartbeatStaleTrialCallback) when a search resumes, so a killed search continues where it stopped. `--workers
K` starts K-1 more processes on the same study; the budget `trials` counts every trial that completed, was
pruned, failed on its own error or is running.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConfigError
from .config import SearchPlan
from .memory import peak_mib, reset_peak
from .pruning import PruningCallback, build_pruner, objective_values


def storage_url(plan: SearchPlan, storage: str | None) -> str:
    if storage:
        return storage
    Path(plan.search.output_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(plan.search.output_dir).resolve() / 'study.db'}"


def open_study(plan: SearchPlan, storage: str | None, name: str | None, create: bool = True):
    """The plan's study on its storage (created if absent); errors name the URL before any trial runs."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    if not create and not storage and not (Path(plan.search.output_dir) / "study.db").is_file():
        raise ConfigError(f"--show: no study database {Path(plan.search.output_dir) / 'study.db'} (run the search "
                          f"first, or give --storage)")
    url = storage_url(plan, storage)
    hb = plan.search.heartbeat
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat, retry
    try:
        store = RDBStorage(url, heartbeat_interval=hb, grace_period=3 * hb,
                           heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as err:  # SQLAlchemy's errors: bad URL, missing driver, unreachable server, bad path
        raise ConfigError(f"--storage: cannot open {url!r}: {type(err).__name__}: {str(err).splitlines()[0]}") from None
    name = name or Path(plan.source).stem
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=store)
        except KeyError:
            raise ConfigError(f"--study: no study {name!r} in {url}") from None
    study = optuna.create_study(study_name=name, storage=store, sampler=build_sampler(plan),
                                directions=plan.search.directions(), load_if_exists=True)
    study.set_user_attr("objectives", plan.search.objectives)
    if [d.name.lower() for d in study.directions] != plan.search.directions():
        raise ConfigError(f"--study: {name!r} in {url} optimises {len(study.directions)} other objective(s); "
                          f"use another --study name for objectives {plan.search.objectives}")
    return study


def build_sampler(plan: SearchPlan):
    from optuna import samplers
    s, seed = plan.search.sampler, plan.search.seed
    if s == "nsga2":
        return samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, plan.search.trials // 3)))
    if s in ("motpe", "tpe"):
        return samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=min(10, max(
            2, plan.search.trials // 4)))
    if s == "gp":
        return samplers.GPSampler(seed=seed, n_startup_trials=min(10, max(2, plan.search.trials // 4)))
    if s == "grid":
        return samplers.GridSampler(plan.space.grid(), seed=seed)
    return samplers.RandomSampler(seed=seed)


def counted(study, before: int | None = None) -> int:
    """Trials that use up the budget: finished, pruned, failed on their own error, or running (only those
    numbered below `before` when given)."""
    from optuna.trial import TrialState
    n = 0
    for t in study.get_trials(deepcopy=False):
        if before is not None and t.number >= before:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
            n += 1
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            n += 1
    return n


class Surplus(Exception):
    """A trial asked for after the budget was spent by lower-numbered trials of other workers.

    Workers check the budget between trials, so two of them can each ask for a last trial at once; trial
    numbers are assigned in order by the storage, so the later one sees the budget spent and ends FAIL
    without an `error` attribute, which the budget does not count."""


def objective(plan: SearchPlan, study, threads: int | None):
    """Optuna's objective: train one trial, return its objectives (TrialPruned / an error end it otherwise)."""
    import optuna

    from ..train.run import train_run
    s = plan.search

    def run(trial):
        out = Path(s.output_dir) / f"trial-{trial.number:04d}"
        if counted(study, before=trial.number) >= s.trials:
            trial.set_user_attr("surplus", f"budget of {s.trials} spent by lower-numbered trials")
            study.stop()
            raise Surplus(f"trial {trial.number}: the budget of {s.trials} trials is spent")
        trial.set_user_attr("pid", os.getpid())  # which worker ran it
        if trial.user_attrs.get("intermediate"):  # a retry inherits the killed trial's attributes
            trial.set_user_attr("intermediate", {})
        try:
            method, overrides = plan.space.sample(trial)
            if threads is not None and "threads" not in plan.run:
                overrides = [*overrides, ("threads", threads)]
            cfg = plan.trial_config(method, overrides, str(out))
            trial.set_user_attr("run_config", cfg.to_dict())
            callbacks = []
            if s.quality:
                direction = s.directions()[s.objectives.index(s.quality)]
                callbacks.append(PruningCallback(study, trial, s.quality[len("valid_"):], direction,
                                                 build_pruner(s.pruner)))
            baseline = reset_peak()
            summary = train_run(cfg, overwrite=True, show_progress=False, callbacks=callbacks, log=lambda *_: None)
            peak = peak_mib(baseline)
            trial.set_user_attr("peak_mib", peak)
            values = objective_values(s.objectives, {**summary, "peak_mib": peak})
        except optuna.TrialPruned as why:
            trial.set_user_attr("pruned_at", str(why))
            raise
        except Exception as err:  # recorded on the trial; Optuna marks it FAIL and the study goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            raise
        if s.quality:
            trial.set_user_attr("quality", values[s.objectives.index(s.quality)])
        return values
    return run


def work(plan: SearchPlan, study, threads: int | None, on_trial: Callable[[Any, Any], None] | None = None) -> None:
    """Run trials with `study.optimize` (which keeps the heartbeat) until the study's budget is used up;
    shared by every worker on the study. Returns when no trial is left to run or running, so a trial of a
    killed search is retried (after its grace period) before the budget counts as spent."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState
    budget = plan.search.trials

    def stop_when_spent(study, trial):
        if on_trial is not None:
            on_trial(study, trial)
        if counted(study) >= budget:
            study.stop()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        while True:
            # A killed process's trial stops beating: failed (not counted) and enqueued again after 3 beats.
            fail_stale_trials(study)
            left = budget - counted(study)
            if left > 0:
                study.optimize(objective(plan, study, threads), n_trials=left, catch=(Exception,),
                               callbacks=[stop_when_spent], gc_after_trial=True)
            elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(plan.search.heartbeat)  # another worker's trial, or a killed one not yet stale
            else:
                break
    finally:
        optuna.logging.set_verbosity(level)


def run_search(plan: SearchPlan, config_path: str, storage: str | None = None, study_name: str | None = None,
               workers: int = 1, overrides: list[str] | None = None, progress: bool = True,
               worker_cmd: list[str] | None = None) -> Any:
    """The whole search: this process and `workers - 1` more on the same study; returns the study.
    `worker_cmd`: the `unipeft` arguments that start one more worker (default: `search CONFIG --worker`),
    completed with --storage and --study."""
    from tqdm.auto import tqdm
    if workers < 1:
        raise ConfigError(f"--workers: expected a positive integer, got {workers}")
    study = open_study(plan, storage, study_name)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    children = []
    if worker_cmd is None:
        worker_cmd = ["search", config_path, "--workers", "1", "--worker", *(overrides or [])]
    cmd = [sys.executable, "-m", "unipeft", *worker_cmd, "--storage", storage_url(plan, storage),
           "--study", study.study_name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:
        env["UNIPEFT_SEARCH_THREADS"] = str(threads)
    for _ in range(workers - 1):
        children.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    bar = tqdm(total=plan.search.trials, initial=min(counted(study), plan.search.trials), desc="trials",
               disable=not progress)

    def shown(study, trial):
        bar.n = min(counted(study), plan.search.trials)
        bar.set_postfix(last=f"#{trial.number} {trial.state.name.lower()}")
        bar.refresh()
    try:
        work(plan, study, threads, shown)
    finally:
        for child in children:
            _, err = child.communicate()
            if child.returncode:
                print(f"search worker exited with {child.returncode}: {err.strip()[-500:]}", file=sys.stderr)
        bar.close()
    return study
