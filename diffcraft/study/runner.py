"""Running a study on Ray Tune: every mistake refused before anything starts, the driver's lease,
the study's record and MLflow parent run, preflight on the cluster, a new or restored Tuner, and
an exact end (the parent run FINISHED or KILLED, runs a dead driver left behind swept).

Everything the study persists lives in its storage location (`storage/name`, a folder or an
object-store URI): `study.json` (`study.record`) and `lease.json` (`study.lease`), Tune's
experiment state (`tune/`), every trial's Ray Train checkpoints (`train/<trial id>/`), and with a
local folder the Optuna database. Nothing a trial or a later command needs lives only on the
launcher's disk.
"""
from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from diffcraft import raytools
from diffcraft.data.cache import require_manifest
from diffcraft.errors import StudyConfigError
from diffcraft.model_uri import default_tracking_uri
from diffcraft.storage import Location, filesystem
from diffcraft.study.config import StudyConfig
from diffcraft.study.faults import fault_point
from diffcraft.study.lease import Lease, acquire_lease, check_lease_free, fence_held
from diffcraft.study.outcome import sweep_orphan_runs, trial_run_callback
from diffcraft.study.preflight import preflight
from diffcraft.study.record import StudyRecord
from diffcraft.study.report import describe_study_run
from diffcraft.study.search import fail_orphan_suggestions, scheduler, search_algorithm
from diffcraft.study.tracking import mark_model_training, require_server_for_cluster, trial_runs
from diffcraft.study.trial import TRIAL_DRIVER_MEMORY, trial_main
from diffcraft.train.provenance import COMMAND_ENV, command


@dataclass
class StudyOutcome:
    results: object  # Tune's ResultGrid
    counts: dict  # MLflow trial runs per status
    interrupted: bool

    @property
    def failed(self) -> int:
        return self.counts.get("FAILED", 0)


def refuse_before_starting(study: StudyConfig, address: str | None, resume: bool, take_over: bool) -> str:
    """Every mistake that can be seen before Ray and MLflow: nothing to resume, a different study
    file under a used name, another driver holding the study, a local MLflow store for a cluster,
    no cache. Returns the study's tracking URI (the stored one when it exists)."""
    stored = StudyRecord.load(study.location)
    if resume and stored is None:
        raise StudyConfigError(f"{study.location}: no study to resume here")
    if stored is not None:
        stored.refuse_another_file(study)
    check_lease_free(study.location, take_over)
    require_server_for_cluster(study.mlflow.tracking_uri, address)
    require_manifest(Location.of(study.run.data.cache))
    return stored.tracking_uri if stored else default_tracking_uri(study.mlflow.tracking_uri)


def _forward_sigterm(received: threading.Event):
    """SIGTERM ends the run the way Ctrl-C does: Tune saves its state and returns (SIGUSR1 is
    Tune's own interrupt signal); `received` remembers it."""
    def handler(signum, frame):
        received.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    return signal.signal(signal.SIGTERM, handler)


def _fence_callback():
    """A Tune callback that checks the lease before each step of Tune's loop: a driver that lost
    its study (paused past the lease, cut off) stops before Tune writes its state again."""
    from ray.tune import Callback

    class Fence(Callback):
        def on_step_begin(self, iteration, trials, **info):
            fence_held()

    return Fence()


def _tuner(study: StudyConfig, record: StudyRecord, lease: Lease, verbose: int, retry_failed: bool):
    """Tune's Tuner over the study's storage: restored where Tune left a state, else new."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(trial_main, study=study, record=record, lease=lease.ref),
                                    tune.PlacementGroupFactory([{"memory": TRIAL_DRIVER_MEMORY}]))
    fs, tune_root = filesystem(study.location.uri)
    tune_path = f"{tune_root}/tune"
    if tune.Tuner.can_restore(tune_path, storage_filesystem=fs):
        # a trial that failed (after its max_retries) stays failed on resume unless asked: one that
        # fails deterministically would otherwise run again on every resume
        return tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=retry_failed,
                                  storage_filesystem=fs)
    return tune.Tuner(
        trainable, param_space=study.search.tune_space(study.run.train.seed),
        tune_config=tune.TuneConfig(metric=study.objective.metric, mode=study.objective.mode,
                                    search_alg=search_algorithm(study), scheduler=scheduler(study),
                                    num_samples=study.search.samples, max_concurrent_trials=study.concurrency,
                                    reuse_actors=False),  # a stopped trial's process must end: it owns its Train run
        run_config=tune.RunConfig(name="tune", storage_path=tune_root, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=study.max_retries),
                                  callbacks=[_fence_callback(), trial_run_callback(study, record)],
                                  verbose=verbose))


def _preflight(study: StudyConfig, tracking_uri: str, ray, progress) -> None:
    """Can the cluster run the study and every node reach what a trial needs: else nothing starts."""
    check = preflight(study, tracking_uri, ray)
    for line in check.notes:
        progress(f"preflight: {line}")
    if not check.ok:
        raise StudyConfigError("preflight failed, nothing started:\n  " + "\n  ".join(check.problems))


def _fit(tuner):
    """Tune's fit, SIGTERM handled as Ctrl-C: (Tune's ResultGrid, whether SIGTERM interrupted it).
    A study stopped between two trials has no unfinished trial in the grid to say so."""
    received = threading.Event()
    previous = _forward_sigterm(received)
    try:
        return tuner.fit(), received.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finish(study: StudyConfig, record: StudyRecord, results, progress, stopped: bool = False) -> StudyOutcome:
    """End the parent run FINISHED, or KILLED when trials are left (their runs swept), with the
    trial counts; describe the result on it."""
    client = record.client()
    counts: dict[str, int] = {}
    for run in trial_runs(client, record):
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    interrupted = stopped or results.num_terminated + results.num_errors < len(results) or "RUNNING" in counts
    client.log_metric(record.parent_run_id, "trials_finished", counts.get("FINISHED", 0))
    client.log_metric(record.parent_run_id, "trials_failed", counts.get("FAILED", 0))
    client.set_terminated(record.parent_run_id, "KILLED" if interrupted else "FINISHED")
    if interrupted:
        sweep_orphan_runs(record)
    else:
        fail_orphan_suggestions(study)
    try:
        describe_study_run(study)
    except Exception as err:  # noqa: BLE001 - the trials' results stand without their summary
        progress(f"could not write the study's description to its MLflow run ({type(err).__name__}: {err})")
    return StudyOutcome(results, counts, interrupted)


def _end_killed(study: StudyConfig) -> None:
    """Whatever stopped the driver, the study's parent run does not stay RUNNING."""
    record = StudyRecord.load(study.location)
    if record is not None:
        try:
            record.client().set_terminated(record.parent_run_id, "KILLED")
        except Exception:  # noqa: BLE001 - the original error matters more
            pass


def run_study(study: StudyConfig, address: str | None = None, resume: bool = False, verbose: int = 1,
              take_over: bool = False, retry_failed: bool = False, progress=print) -> StudyOutcome:
    """Run `study` on Ray Tune, or continue it where it stands (`resume`, or the same study file
    run again). Returns the outcome; the CLI exits non-zero when a trial failed."""
    tracking_uri = refuse_before_starting(study, address, resume, take_over)
    os.environ.setdefault(COMMAND_ENV, command())  # what every trial records as its command (`train.provenance`)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # snapshot the experiment often: resume loses little
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # the 2 s default adds seconds per epoch
    env = raytools.forwarded_env(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"])
    with raytools.ray_session(address, runtime_env={"env_vars": env}) as ray:
        _preflight(study, tracking_uri, ray, progress)  # a refused study leaves no record, lease or run
        lease = acquire_lease(study.location, take_over)
        try:
            record = StudyRecord.open(study)
            swept = sweep_orphan_runs(record)
            if swept:
                progress(f"marked {len(swept)} trial run(s) of a lost driver KILLED; Tune resumes their trials")
            client = record.client()
            mark_model_training(client, record.experiment_id)
            client.update_run(record.parent_run_id, status="RUNNING")
            fault_point("driver_before_tune")  # lease, record and parent run exist; Tune has written nothing
            results, stopped = _fit(_tuner(study, record, lease, verbose, retry_failed))
            lease.fence()
            return _finish(study, record, results, progress, stopped)
        except BaseException:
            lease.fence()
            _end_killed(study)
            raise
        finally:
            lease.release()
