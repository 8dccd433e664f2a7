"""The hardest recovery windows, hit on purpose (`study.faults`), not by a timed kill: a driver
killed after an epoch is logged, and after its lease, record and parent run exist but before
Tune's first state; a worker that exits after committing a checkpoint and before logging its
epoch. Each ends with every epoch in MLflow once and every run FINISHED."""
import os
import sys

import pytest
from mlflow.tracking import MlflowClient

from diffcraft.study.studyfile import load_study
from tests.kit import kill_group, read_output, run_driver, start_driver, wait_for_output
from tests.test_study import write_study

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "diffcraft.cli"]
ENV = {"RAY_ADDRESS": "", "RAY_DEDUP_LOGS": "0"}


def runs(study):
    client = MlflowClient(study.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(study.name)
    found = [] if exp is None else client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in found if r.data.tags.get("role") == "study"]
    return client, parents, [r for r in found if r.data.tags.get("trial_id")]


def assert_finished_with_each_epoch_once(study, epochs: int, trials: int) -> list:
    client, parents, children = runs(study)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert len(children) == trials and all(r.info.status == "FINISHED" for r in children), [r.info for r in children]
    for run in children:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mss_mean"))
        assert steps == list(range(epochs)), (run.data.tags["trial_id"], steps)
    return children


def test_a_driver_killed_after_its_lease_and_record_but_before_tunes_first_state(synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 2}}, concurrency=1)
    first = start_driver([*CLI, "study", "run", str(path)], env={**ENV, "DIFFCRAFT_FAULT": "driver_before_tune"},
                         cwd=tmp_path)
    try:
        wait_for_output(first, "diffcraft fault: driver_before_tune", timeout=300)
    finally:
        kill_group(first)
        first.wait()
    study = load_study(path)
    assert (study.location / "lease.json").exists() and (study.location / "study.json").exists()
    assert not (study.location / "tune").exists()  # the window: Tune has written nothing yet
    done = run_driver([*CLI, "study", "run", str(path)], env=ENV, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert_finished_with_each_epoch_once(study, 2, 1)


def test_a_driver_killed_after_a_logged_epoch_resumes_each_epoch_once(synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 3}}, concurrency=1)
    study = load_study(path)
    first = start_driver([*CLI, "study", "run", str(path)], env=ENV, cwd=tmp_path)
    try:
        import time

        deadline, logged = time.time() + 300, 0
        while not logged and time.time() < deadline and first.poll() is None:
            time.sleep(0.3)
            try:
                client, _, children = runs(study)
                logged = children and len(client.get_metric_history(children[0].info.run_id, "val_mss_mean"))
            except Exception:  # noqa: BLE001 - the experiment is not created yet
                pass
        assert logged, read_output(first)[-3000:]
    finally:
        kill_group(first)
        first.wait()
    client, _, children = runs(study)
    assert len(client.get_metric_history(children[0].info.run_id, "val_mss_mean")) < 3  # killed mid-trial
    done = run_driver([*CLI, "study", "resume", "s", "--storage", str(tmp_path / "studies")], env=ENV, cwd=tmp_path,
                      timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert_finished_with_each_epoch_once(study, 3, 1)


def test_a_worker_that_exits_after_its_commit_and_before_its_log_loses_no_epoch(synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 2}}, concurrency=1, max_retries=1)
    marker = tmp_path / "worker-exited"
    done = run_driver([*CLI, "study", "run", str(path)], cwd=tmp_path, timeout=600,
                      env={**ENV, "DIFFCRAFT_FAULT": f"worker_after_commit:{marker}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert marker.exists()  # the worker did exit between its commit and its log
    (run,) = assert_finished_with_each_epoch_once(load_study(path), 2, 1)
    assert run.data.tags["attempts"] == "2"
