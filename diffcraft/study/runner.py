"""Running a study on Ray Tune: search algorithm, scheduler, resources, the MLflow parent run,
the driver's lease, preflight, resume and an exact end.

Everything the study persists lives in its storage location (`storage/name`, a folder or an
object-store URI): `study.json` and `lease.json` (`study.state`), Tune's experiment state
(`tune/`), every trial's Ray Train checkpoints (`train/<trial id>/`), and with a local folder the
Optuna database. Nothing a trial or a later command needs lives only on the launcher's disk.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass

from diffcraft.typed_yaml import from_dict
from diffcraft.raytools import forwarded_env
from diffcraft.storage import Location, filesystem
from diffcraft.study.schema import StudyConfig, StudyConfigError, parse_distribution
from diffcraft.study.state import acquire_lease, load_state, save_state
from diffcraft.study.tracking import (code_version, default_tracking_uri, experiment_id, mark_model_training,
                                      require_server_for_cluster, trial_runs)


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
        base = study.run.train.seed
        space["train.seed"] = tune.grid_search([base + i for i in range(study.search.seeds)])
    return space


def optuna_storage(study: StudyConfig):
    """Optuna's storage: the configured RDB URL; else a SQLite file in a local storage folder; else
    none (the sampler's history then travels in Tune's experiment state in the object store)."""
    import optuna

    if study.optuna.storage:
        return optuna.storages.RDBStorage(study.optuna.storage)
    local = study.location.local_path()
    if local is None:
        return None
    local.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{local / 'optuna.db'}")


def fail_orphan_suggestions(study: StudyConfig) -> list[int]:
    """Optuna trials left RUNNING once the whole study has ended: suggestions whose driver died
    before Tune's snapshot recorded them (Tune suggested them again after the resume). Marked
    FAIL, so the sampler's history holds no trial that never ends. Returns their numbers."""
    if study.search.algorithm != "optuna" or (storage := optuna_storage(study)) is None:
        return []
    import optuna

    try:
        opt = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:  # no trial was ever suggested
        return []
    stale = [t.number for t in opt.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in stale:
        opt.tell(number, state=optuna.trial.TrialState.FAIL)
    return stale


def _search_and_scheduler(study: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ray.tune.search.basic_variant import BasicVariantGenerator

    # grid and random: values sampled once per sample and kept over the seeds' grid; Tune applies
    # max_concurrent_trials to Searchers only, so a generator of variants is given it here
    search = BasicVariantGenerator(constant_grid_search=True, max_concurrent=study.concurrency)
    if study.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(metric=study.objective.metric, mode=study.objective.mode, study_name=study.name,
                              storage=optuna_storage(study), seed=study.run.train.seed)
    if study.scheduler.kind == "asha":  # compared on epochs done, so a restarted trial has the right budget
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=study.run.train.epochs,
                                  grace_period=study.scheduler.grace_epochs,
                                  reduction_factor=study.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return search, scheduler


def _differences(stored: dict, study: StudyConfig) -> dict[str, tuple]:
    """{dotted field: (as started, in this file)} where they differ."""
    from diffcraft.typed_yaml import flatten

    old, new = flatten(stored), flatten(study.plain())
    return {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}


def refuse_a_different_file(study: StudyConfig, state: dict | None) -> None:
    """A study name already used by a different study file is refused, saying what differs."""
    if state is None:
        return
    differ = _differences(state["study"], study)
    if differ:
        shown = [f"{k} was {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items())[:8]]
        raise StudyConfigError(
            f"{study.location}: study {study.name!r} exists and was started from a different study file "
            f"({', '.join(sorted(differ)[:8])}{' ...' if len(differ) > 8 else ''} differ): {'; '.join(shown)}. "
            f"Give this one another name, or continue the stored one with "
            f"`diffcraft study resume {study.name} --storage {study.storage}`")


def open_study(study: StudyConfig) -> dict:
    """The study's state: MLflow experiment and parent run, created once and reused after. Read
    again under the lease: a study file that differs from the one another driver started the study
    with a moment ago is refused too."""
    from mlflow.tracking import MlflowClient

    state = load_state(study.location)
    if state is not None:
        refuse_a_different_file(study, state)
        return state
    uri = default_tracking_uri(study.mlflow.tracking_uri)
    client = MlflowClient(uri)
    exp = experiment_id(client, study.mlflow.experiment or study.name, uri)
    parent = client.create_run(exp, run_name=f"study {study.name}",
                               tags={"study": study.name, "role": "study", "code_version": code_version(),
                                     "search": study.search.algorithm, "scheduler": study.scheduler.kind})
    client.log_dict(parent.info.run_id, asdict(study), "study.yaml")
    state = {"name": study.name, "tracking_uri": uri, "experiment_id": exp, "parent_run_id": parent.info.run_id,
             "study": study.plain(), "created": time.time()}
    save_state(study.location, state)
    return state


def sweep_orphan_runs(state: dict) -> list[str]:
    """Trial runs left RUNNING by a driver that died: its trials died with it. They are marked
    KILLED; a trial that Tune resumes sets its run RUNNING again."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    swept = []
    for run in trial_runs(client, state):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "ended_by", "driver_lost")
            client.set_terminated(run.info.run_id, "KILLED")
            swept.append(run.data.tags.get("trial_id", run.info.run_id))
    return swept


@dataclass
class StudyOutcome:
    results: object  # Tune's ResultGrid
    counts: dict  # MLflow trial runs per status
    interrupted: bool

    @property
    def failed(self) -> int:
        return self.counts.get("FAILED", 0)


def _forward_sigterm():
    """SIGTERM ends the run the way Ctrl-C does: Tune saves its state and returns (SIGUSR1 is
    Tune's own interrupt signal)."""
    def handler(signum, frame):
        os.kill(os.getpid(), signal.SIGUSR1)

    return signal.signal(signal.SIGTERM, handler)


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False, verbose: int = 1,
              take_over: bool = False, progress=print) -> StudyOutcome:
    """Run `study` on Ray Tune, or continue it where it stands (`resume`, or the same study file
    run again). Returns the outcome; the CLI exits non-zero when a trial failed."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from diffcraft.data.cache import require_manifest
    from diffcraft.raytools import ray_session
    from diffcraft.study.preflight import preflight
    from diffcraft.study.report import describe_study_run
    from diffcraft.study.trial import TRIAL_DRIVER_MEMORY, trial_main, trial_run_callback

    stored = load_state(study.location)  # every mistake is refused before the lease, Ray and MLflow
    if resume and stored is None:
        raise StudyConfigError(f"{study.location}: no study to resume here")
    refuse_a_different_file(study, stored)
    require_server_for_cluster(study.mlflow.tracking_uri, address)
    require_manifest(Location.of(study.run.data.cache))
    lease = acquire_lease(study.location, take_over)
    try:
        state = open_study(study)
        swept = sweep_orphan_runs(state)
        if swept:
            progress(f"marked {len(swept)} trial run(s) of a lost driver KILLED; Tune resumes their trials")
        client = MlflowClient(state["tracking_uri"])
        mark_model_training(client, state["experiment_id"])
        client.update_run(state["parent_run_id"], status="RUNNING")
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot the experiment often: resume loses little
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # the 2 s default adds seconds per epoch
        env = forwarded_env(MLFLOW_TRACKING_URI=state["tracking_uri"],
                            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"])
        with ray_session(address, runtime_env={"env_vars": env}) as ray:
            check = preflight(study, state["tracking_uri"], ray)
            for line in check.notes:
                progress(f"preflight: {line}")
            if not check.ok:
                raise StudyConfigError("preflight failed, nothing started:\n  " + "\n  ".join(check.problems))
            trainable = tune.with_resources(tune.with_parameters(trial_main, study=study, state=state),
                                            tune.PlacementGroupFactory([{"memory": TRIAL_DRIVER_MEMORY}]))
            fs, tune_root = filesystem(study.location.uri)
            tune_path = f"{tune_root}/tune"
            if tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
                tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                           storage_filesystem=fs)
            else:
                search, scheduler = _search_and_scheduler(study)
                tuner = tune.Tuner(
                    trainable, param_space=param_space(study),
                    tune_config=tune.TuneConfig(metric=study.objective.metric, mode=study.objective.mode,
                                                search_alg=search, scheduler=scheduler,
                                                num_samples=study.search.samples,
                                                max_concurrent_trials=study.concurrency,
                                                reuse_actors=False),  # a stopped trial's process must end: it owns its Train run
                    run_config=tune.RunConfig(name="tune", storage_path=tune_root, storage_filesystem=fs,
                                              failure_config=tune.FailureConfig(max_failures=study.max_retries),
                                              callbacks=[trial_run_callback(study, state)], verbose=verbose))
            previous = _forward_sigterm()
            try:
                results = tuner.fit()
            finally:
                signal.signal(signal.SIGTERM, previous)
        counts: dict[str, int] = {}
        for run in trial_runs(client, state):
            counts[run.info.status] = counts.get(run.info.status, 0) + 1
        interrupted = results.num_terminated + results.num_errors < len(results) or "RUNNING" in counts
        client.log_metric(state["parent_run_id"], "trials_finished", counts.get("FINISHED", 0))
        client.log_metric(state["parent_run_id"], "trials_failed", counts.get("FAILED", 0))
        client.set_terminated(state["parent_run_id"], "KILLED" if interrupted else "FINISHED")
        if interrupted:
            sweep_orphan_runs(state)
        else:
            fail_orphan_suggestions(study)
        try:
            describe_study_run(study)
        except Exception as err:  # noqa: BLE001 - the trials' results stand without their summary
            progress(f"could not write the study's description to its MLflow run ({type(err).__name__}: {err})")
        return StudyOutcome(results, counts, interrupted)
    except BaseException:
        state = load_state(study.location)
        if state is not None:  # whatever stopped the driver, its parent run does not stay RUNNING
            try:
                MlflowClient(state["tracking_uri"]).set_terminated(state["parent_run_id"], "KILLED")
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        lease.release()


def study_from_storage(name: str, storage: str = "studies") -> StudyConfig:
    """The StudyConfig saved when study `name` was started in `storage` (a folder or a URI)."""
    location = Location.of(storage) / name
    state = load_state(location)
    if state is None:
        raise StudyConfigError(f"{location}: no study called {name!r} here")
    return from_dict(StudyConfig, state["study"])
