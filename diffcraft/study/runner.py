"""Running a study on Ray Tune: search algorithm, scheduler, resources, MLflow parent run, resume.

Each trial is a Tune function trainable (`study.trial.trial_main`). With `resources.workers: 1`
it runs the training loop in its own process with `cpus_per_worker` CPUs and `gpus_per_worker`
GPUs; with more it drives a Ray Train TorchTrainer of that many workers (DDP, gloo on CPU, NCCL
on GPU). A TorchTrainer costs 8-15 s of fixed start-up per trial on this hardware, which is why a
one-worker trial does without it.
The study folder `storage/name` holds Tune's experiment state (`tune/`), each trial's run folder
with its checkpoints (`trials/<trial id>/`, so a restarted or resumed trial continues from its
last epoch), and `study.json` (the MLflow experiment and parent run).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from diffcraft.config import from_dict
from diffcraft.study.schema import StudyConfig, StudyConfigError, parse_distribution
from diffcraft.study.tracking import code_version, default_tracking_uri, experiment_id, trial_runs

STATE = "study.json"


def param_space(study: StudyConfig) -> dict:
    """Tune's param_space: one Tune domain per searched field, seeds as a grid."""
    from ray import tune

    domains = {
        "loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
        "int": lambda v: tune.randint(v[0], v[1] + 1), "choice": tune.choice, "grid": tune.grid_search,
    }
    space = {}
    for key, spec in study.search.space.items():
        kind, values = parse_distribution(key, spec)
        space[key] = domains[kind](values)
    if study.search.seeds > 1:
        base = study.base_run().train.seed
        space["train.seed"] = tune.grid_search([base + i for i in range(study.search.seeds)])
    return space


def check_resources(study: StudyConfig, cluster: dict) -> None:
    """Fail at once, with the numbers, when one trial can never be scheduled on this cluster."""
    r = study.resources
    need_cpu = trial_resources(study)["cpu"] + (r.workers * r.cpus_per_worker if r.workers > 1 else 0)
    need_gpu = r.workers * r.gpus_per_worker
    have_cpu, have_gpu = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if need_cpu > have_cpu or need_gpu > have_gpu:
        raise StudyConfigError(
            f"resources: one trial needs {need_cpu:g} CPUs and {need_gpu:g} GPUs "
            f"({r.workers} worker(s) x {r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU), but the "
            f"Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs in all: it could never start")


def trial_resources(study: StudyConfig) -> dict:
    """What the Tune trial itself holds: the worker's share with one worker; with several, a
    sliver of a CPU for the Ray Train driver (its workers hold their own)."""
    r = study.resources
    if r.workers > 1:
        return {"cpu": 0.01, "gpu": 0}
    return {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker}


def _search_and_scheduler(study: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    search = None
    if study.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        storage = optuna.storages.RDBStorage(f"sqlite:///{study.directory / 'optuna.db'}")
        search = OptunaSearch(metric=study.objective.metric, mode=study.objective.mode,
                              study_name=study.name, storage=storage,
                              seed=study.base_run().train.seed)
    if study.scheduler.kind == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=study.base_run().train.epochs,
                                  grace_period=study.scheduler.grace_epochs,
                                  reduction_factor=study.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return search, scheduler


def load_state(study_dir: Path) -> dict | None:
    path = study_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def started_state(study: StudyConfig) -> dict:
    """The saved state of a study that has been started, or an error saying it has not."""
    state = load_state(study.directory)
    if state is None:
        raise StudyConfigError(f"{study.directory}: study {study.name!r} has not been started")
    return state


def save_state(study_dir: Path, state: dict) -> None:
    study_dir.mkdir(parents=True, exist_ok=True)
    tmp = study_dir / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, study_dir / STATE)


def open_study(study: StudyConfig) -> dict:
    """The study's MLflow experiment and parent run (created once, reused on resume)."""
    from mlflow.tracking import MlflowClient

    state = load_state(study.directory)
    if state is not None:
        return state
    uri = default_tracking_uri(study.mlflow.tracking_uri)
    client = MlflowClient(uri)
    exp = experiment_id(client, study.mlflow.experiment or study.name, uri)
    parent = client.create_run(exp, run_name=f"study {study.name}",
                               tags={"study": study.name, "role": "study", "code_version": code_version(),
                                     "search": study.search.algorithm, "scheduler": study.scheduler.kind})
    client.log_dict(parent.info.run_id, asdict(study), "study.yaml")
    state = {"name": study.name, "tracking_uri": uri, "experiment_id": exp,
             "parent_run_id": parent.info.run_id, "study": asdict(study), "created": time.time()}
    save_state(study.directory, state)
    return state


def finalize_runs(state: dict, results) -> dict[str, int]:
    """After Tune: end the MLflow runs that trials could not end themselves (stopped early by the
    scheduler, or killed), so none stays RUNNING; return the count of runs per status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    errored = {r.metrics.get("trial_id") for r in results if r.error} if results is not None else set()
    runs = trial_runs(client, state)
    counts: dict[str, int] = {}
    for run in runs:
        status = run.info.status
        if status == "RUNNING":
            trial = run.data.tags.get("trial_id")
            status = "FAILED" if trial in errored else "KILLED"
            client.set_tag(run.info.run_id, "ended_by", "scheduler" if status == "KILLED" else "error")
            client.set_terminated(run.info.run_id, status)
        counts[status] = counts.get(status, 0) + 1
    return counts


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False,
              verbose: int = 1):
    """Run (or resume) `study` on Ray Tune; returns Tune's ResultGrid."""
    from ray import tune

    from diffcraft.raytools import ray_session
    from diffcraft.study.trial import trial_main

    tune_dir = study.directory / "tune"
    if resume and not tune_dir.is_dir():
        raise StudyConfigError(f"{study.directory}: no study to resume here")
    if not resume and tune_dir.is_dir():
        raise StudyConfigError(f"{study.directory}: a study called {study.name!r} already exists; "
                               f"use `diffcraft study resume {study.name}` or another name")
    from diffcraft.data.prepare import load_manifest

    cache = study.base_run().data.cache
    if load_manifest(Path(cache)) is None:
        raise StudyConfigError(f"run.data.cache: {cache}: no feature cache there "
                               "(build one with `diffcraft data prepare`)")
    state = open_study(study)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot the experiment often: resume loses little
    env = {"MLFLOW_TRACKING_URI": state["tracking_uri"]}
    with ray_session(address, runtime_env={"env_vars": env}) as ray:
        check_resources(study, ray.cluster_resources())
        trainable = tune.with_resources(
            tune.with_parameters(trial_main, study=study, experiment_id=state["experiment_id"],
                                 parent_run_id=state["parent_run_id"], tracking_uri=state["tracking_uri"]),
            trial_resources(study))
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        else:
            search, scheduler = _search_and_scheduler(study)
            tuner = tune.Tuner(
                trainable, param_space=param_space(study),
                tune_config=tune.TuneConfig(metric=study.objective.metric, mode=study.objective.mode,
                                            search_alg=search, scheduler=scheduler,
                                            num_samples=study.search.samples,
                                            max_concurrent_trials=study.concurrency,
                                            reuse_actors=True),
                run_config=tune.RunConfig(name="tune", storage_path=str(study.directory),
                                          failure_config=tune.FailureConfig(max_failures=study.max_retries),
                                          verbose=verbose))
        results = tuner.fit()
        counts = finalize_runs(state, results)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    client.log_metric(state["parent_run_id"], "trials_finished", counts.get("FINISHED", 0))
    client.log_metric(state["parent_run_id"], "trials_failed", counts.get("FAILED", 0))
    client.set_terminated(state["parent_run_id"], "FINISHED")
    return results


def study_from_storage(name: str, storage: str = "studies") -> StudyConfig:
    """The StudyConfig saved when study `name` was started in `storage`."""
    state = load_state(Path(storage).resolve() / name)
    if state is None:
        raise StudyConfigError(f"{Path(storage).resolve() / name}: no study called {name!r} here")
    return from_dict(StudyConfig, state["study"])
