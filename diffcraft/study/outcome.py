"""How a trial's MLflow run ends: FINISHED when it trained every epoch (or the collapse guard
stopped it), KILLED with the reason when the scheduler stopped it early, FAILED with the error;
the Tune callback that ends each run as its trial ends, and the sweep that ends the runs a dead
driver left RUNNING.
"""
from __future__ import annotations

from diffcraft.study.artifacts import log_trial_artifacts
from diffcraft.study.config import StudyConfig
from diffcraft.study.record import StudyRecord
from diffcraft.study.timeline import mark
from diffcraft.study.tracking import TrialRun, trial_runs
from diffcraft.train.names import COLLAPSED, EPOCHS_DONE


def end_trial_run(study: StudyConfig, record: StudyRecord, trial, failed: bool = False) -> str:
    """End a trial's MLflow run as its Tune trial ends (see the module docstring). Artifacts are
    logged first in every case that has a checkpoint, so a trial stopped early can still be
    promoted. Returns the status."""
    client = record.client()
    found = client.search_runs([record.experiment_id], f"tags.trial_id = '{trial.trial_id}'", max_results=1)
    if not found:
        return "MISSING"
    run = TrialRun(client, found[0].info.run_id)
    last = trial.last_result or {}
    if not failed:
        try:
            log_trial_artifacts(run, study, trial.trial_id)
        except Exception as err:  # noqa: BLE001 - the run still ends; the tag says what is missing
            run.tag(artifacts_error=f"{type(err).__name__}: {err}"[:5000])
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
    """The Tune callback that ends each trial's MLflow run when the trial ends."""
    from ray.tune import Callback

    class EndTrialRuns(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            mark("trial_start", trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            mark("trial_complete", trial.trial_id)
            end_trial_run(study, record, trial)
            mark("run_ended", trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            end_trial_run(study, record, trial, failed=True)

    return EndTrialRuns()


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
