"""A resume reconciles MLflow with Tune's record: a trial Tune finished whose run a lost driver
left open ends FINISHED (and can be promoted); a trial that failed is not run again on every
resume, only when asked (`--retry-failed`); runs are matched within the study's parent run."""
import pytest
from mlflow.tracking import MlflowClient

from diffcraft.study.runner import run_study
from diffcraft.study.studyfile import load_study
from tests.test_study import write_study

pytestmark = pytest.mark.slow


def trial_run(study, **match):
    client = MlflowClient(study.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(study.name)
    runs = [r for r in client.search_runs([exp.experiment_id], "tags.trial_id != ''")
            if all(r.data.params.get(k) == v for k, v in match.items())]
    assert len(runs) == 1, runs
    return client, runs[0]


def test_a_finished_trial_whose_run_was_left_open_is_finished_on_resume(ray_local, synth_cache, tmp_path):
    study = load_study(write_study(tmp_path, synth_cache, name="left_open"))
    run_study(study, verbose=0)
    client, run = trial_run(study)
    assert run.info.status == "FINISHED"
    # a driver killed inside the trial's completion callback: Tune recorded the trial TERMINATED,
    # MLflow still has the run open
    client.update_run(run.info.run_id, status="RUNNING")
    for key in [k for k in run.data.tags if k in ("ended_by",)]:
        client.delete_tag(run.info.run_id, key)
    outcome = run_study(study, resume=True, verbose=0)
    _, run = trial_run(study)
    assert run.info.status == "FINISHED" and "ended_by" not in run.data.tags, run.data.tags
    assert outcome.counts == {"FINISHED": 1}


def test_a_failed_trial_runs_again_only_when_asked(ray_local, synth_cache, tmp_path):
    study = load_study(write_study(tmp_path, synth_cache, name="fails", run={"train": {"lr": 1e12}}))
    assert run_study(study, verbose=0).failed == 1
    _, run = trial_run(study)
    assert run.info.status == "FAILED" and run.data.tags.get("attempts", "1") == "1"
    assert run_study(study, resume=True, verbose=0).failed == 1
    _, run = trial_run(study)
    assert run.data.tags.get("attempts", "1") == "1"  # not started again
    assert run_study(study, resume=True, retry_failed=True, verbose=0).failed == 1
    _, run = trial_run(study)
    assert run.data.tags["attempts"] == "2" and "FloatingPointError" in run.data.tags["previous_error"]
