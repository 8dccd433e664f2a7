"""How a trial's MLflow run ends: FINISHED when it trained every epoch (or the collapse guard
stopped it), KILLED with the reason when the scheduler stopped it early, FAILED with the error;
the Tune callback that ends each run as its trial ends, and the sweep that ends the runs a dead
driver left RUNNING.

The callback runs in Tune's event loop, on the driver: it only reads and ends runs. A trial that
trained to its end has its artifacts from its rank-0 worker (`study.artifacts`); for one the
scheduler stopped, the callback starts a Ray task that logs them and then ends the run, on a node
with CPUs (never a head that runs drivers only), and the study waits for those tasks at its end.
A driver killed while such a task runs takes the task with it: the resumed study sweeps that run
KILLED (ended_by: driver_lost), without its artifacts.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

from diffcraft.study.artifacts import has_artifacts, log_artifacts_once
from diffcraft.study.config import StudyConfig
from diffcraft.study.lease import fence_held
from diffcraft.study.record import StudyRecord
from diffcraft.study.timeline import mark
from diffcraft.study.tracking import TrialRun, find_trial_run, trial_runs
from diffcraft.train.names import COLLAPSED, EPOCHS_DONE


def end_trial_run(study: StudyConfig, record: StudyRecord, trial, failed: bool = False) -> str:
    """End a trial's MLflow run as its Tune trial ends (see the module docstring). Artifacts are
    logged first in every case that has a checkpoint, so a trial stopped early can still be
    promoted. Returns the status."""
    client = record.client()
    found = find_trial_run(client, record.experiment_id, record.parent_run_id, trial.trial_id)
    if not found:
        return "MISSING"
    run = TrialRun(client, found[0].info.run_id)
    last = trial.last_result or {}
    if not failed:
        log_artifacts_once(run, study, trial.trial_id)
    decided_on = int(last.get(EPOCHS_DONE, 0))  # the result Tune ended the trial on
    # the worker does not wait for Tune's verdict: it may have trained and logged on meanwhile
    done = max(decided_on, len(run.logged_epochs()))
    epochs = study.run.train.epochs
    guard_stopped = bool(last.get(COLLAPSED)) and study.collapse_guard.action == "stop" and done < epochs
    if failed:
        status = "FAILED"
        run.tag(ended_by="error", **({} if "error" in found[0].data.tags else
                                    {"error": "the trial's process died (its node was lost or it was killed)"}))
    elif done < epochs and not guard_stopped:
        status = "KILLED"
        run.tag(ended_by="scheduler", stopped_reason=f"stopped by the {study.scheduler.kind} scheduler on its "
                                                     f"result of epoch {decided_on} of {epochs}")
    else:
        status = "FINISHED"
        if guard_stopped:
            run.tag(ended_by="collapse_guard")
    run.end(status)
    return status


def trial_run_callback(study: StudyConfig, record: StudyRecord):
    """The Tune callback that ends each trial's MLflow run when the trial ends (see the module
    docstring), only while this driver holds the study's lease."""
    import ray
    from ray.tune import Callback

    class EndTrialRuns(Callback):
        def __init__(self):
            self.pending = []  # the Ray tasks ending runs of trials the scheduler stopped

        def on_trial_start(self, iteration, trials, trial, **info):
            mark("trial_start", trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            fence_held()
            mark("trial_complete", trial.trial_id)
            self.pending += _end_run(study, record, trial)
            mark("run_ended", trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            fence_held()
            end_trial_run(study, record, trial, failed=True)

        def on_experiment_end(self, trials, **info):
            """Tune ends (finished, or interrupted): runs Tune ended that a lost driver left open are
            ended now, and the study waits for the runs still being ended."""
            fence_held()
            self.pending += reconcile_ended_trials(study, record, trials)
            for ref in self.pending:
                try:
                    ray.get(ref)
                except Exception as err:  # noqa: BLE001 - its run stays RUNNING; the study's end sweeps it
                    logging.getLogger(__name__).warning("a trial's run could not be ended: %s", err)
            self.pending = []

    return EndTrialRuns()


def _end_run(study: StudyConfig, record: StudyRecord, trial) -> list:
    """End the run of a trial Tune finished: here when its artifacts are logged, else by a Ray task
    that logs them first on a node with CPUs (returned, to be waited for)."""
    import ray

    if _artifacts_logged(record, trial.trial_id):
        end_trial_run(study, record, trial)
        return []
    ended = SimpleNamespace(trial_id=trial.trial_id, last_result=dict(trial.last_result or {}))  # a plain copy
    end_remotely = ray.remote(num_cpus=min(1.0, study.resources.cpus_per_worker))(end_trial_run)
    return [end_remotely.remote(study, record, ended)]


def _artifacts_logged(record: StudyRecord, trial_id: str) -> bool:
    """Whether the trial's run has its artifacts (a missing run: nothing to wait for)."""
    found = find_trial_run(record.client(), record.experiment_id, record.parent_run_id, trial_id)
    return not found or has_artifacts(found[0].data.tags)


def reconcile_ended_trials(study: StudyConfig, record: StudyRecord, trials) -> list:
    """Trials Tune has ended whose runs a lost driver left open (or swept KILLED as `driver_lost`)
    before their completion callback ran: ended now from Tune's record, as the callback would
    have (a finished trial is then FINISHED, with its artifacts, and can be promoted). Returns the
    Ray tasks still ending some of them."""
    client = record.client()
    runs = {run.data.tags.get("trial_id"): run for run in trial_runs(client, record)}
    pending = []
    for trial in trials:
        run = runs.get(trial.trial_id)
        if trial.status not in ("TERMINATED", "ERROR") or run is None:
            continue
        if run.info.status == "RUNNING" or run.data.tags.get("ended_by") == "driver_lost":
            if "ended_by" in run.data.tags:
                client.delete_tag(run.info.run_id, "ended_by")
            if trial.status == "ERROR":
                end_trial_run(study, record, trial, failed=True)
            else:
                pending += _end_run(study, record, trial)
    return pending


def sweep_orphan_runs(record: StudyRecord) -> list[str]:
    """Trial runs left RUNNING by a driver that died: its trials died with it. They are marked
    KILLED; a trial that Tune resumes sets its run RUNNING again."""
    client = record.client()
    swept = []
    for run in trial_runs(client, record):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "ended_by", "driver_lost")
            client.set_terminated(run.info.run_id, "KILLED")
            swept.append(run.data.tags.get("trial_id", run.info.run_id))
    return swept
