"""The study engine on a real local Ray (2 CPUs) and a real MLflow SQLite store."""
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from diffcraft.errors import StudyConfigError
from diffcraft.study.lease import acquire_lease
from diffcraft.study.report import write_report
from diffcraft.study.runner import refuse_before_starting, run_study
from diffcraft.study.status import status_lines
from diffcraft.study.studyfile import load_study
from diffcraft.train.metrics import read_clip_table

TINY_RUN = {
    "data": {"batch_size": 2, "clips_per_epoch": 4},
    "model": {"stage": "decoder", "decoder": {"core": "gru", "width": 16, "mlp_layers": 1, "n_harmonics": 8,
                                              "n_noise_bands": 9, "reverb_seconds": 0.05}},
    "train": {"epochs": 2, "lr": 1e-3},
}


def write_study(tmp_path, cache, **fields):
    run = yaml.safe_load(yaml.safe_dump(TINY_RUN))
    run["data"]["cache"] = str(cache)
    for key, value in fields.pop("run", {}).items():
        run.setdefault(key, {}).update(value)
    study = {"name": "s", "run": run, "storage": str(tmp_path / "studies"),
             "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}, "concurrency": 2, **fields}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def child_runs(study):
    client = MlflowClient(study.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return client, parents, children


@pytest.mark.slow
def test_grid_study_logs_nested_runs_with_params_metrics_and_artifacts(ray_local, synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, search={"algorithm": "grid", "space": {
        "model.decoder.core": {"grid": ["gru", "mamba"]}}})
    study = load_study(path)
    results = run_study(study, verbose=0).results
    assert len(results) == 2 and not results.errors
    client, parents, children = child_runs(study)
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.params["model.decoder.core"] for r in children} == {"gru", "mamba"}
    for run in children:
        assert run.info.status == "FINISHED"
        for tag in ("study", "trial_id", "seed", "config_hash", "code_version", "repro.torch", "repro.cache_manifest",
                    "repro.command"):
            assert run.data.tags[tag]
        # the Mamba scan that ran: numba's kernels on a CPU worker, none for a GRU
        assert run.data.tags["scan"] == ("fused" if run.data.params["model.decoder.core"] == "mamba" else "none")
        history = client.get_metric_history(run.info.run_id, "val_mss_mean")
        assert [m.step for m in history] == [0, 1]
        assert "train_mss" in run.data.metrics and "val_mss_sd" in run.data.metrics
        assert run.data.tags["artifacts"] == "logged"  # by the trial's rank-0 worker, after its last epoch
        artifacts = {a.path for folder in ("checkpoint", "figures", "audio", "evaluation")
                     for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"checkpoint/best.pt", "figures/loss_curves.png", "figures/spectrogram_0.png",
                "audio/clip0_synth.wav", "audio/clip0_truth.wav", "evaluation/clips_validation.csv",
                "evaluation/clips_test.csv"} <= artifacts
        # the test split scored at the selected checkpoint; its clips are not the validation clips
        assert run.data.metrics["test_n_clips"] >= 1 and "test_mss_mean" in run.data.metrics
        assert run.data.metrics["n_parameters"] == run.data.metrics["n_parameters_decoder"] > 0
        assert run.data.metrics["seconds_per_epoch"] > 0
        with tempfile.TemporaryDirectory() as tmp:
            val, test = (read_clip_table(open(client.download_artifacts(
                run.info.run_id, f"evaluation/clips_{split}.csv", tmp)).read()) for split in ("validation", "test"))
        assert not set(val["mss"]) & set(test["mss"])
        assert {c.split("/")[0] for c in val["mss"]}.isdisjoint({c.split("/")[0] for c in test["mss"]})
        assert sum(test["mss"].values()) / len(test["mss"]) == pytest.approx(run.data.metrics["test_mss_mean"])
    lines = status_lines(study)
    assert "2 trials (2 finished)" in lines[0] and lines[-1].startswith("best so far")
    report = write_report(study).read_text()
    assert "model.decoder.core=gru" in report and "Numbers from the test split" in report
    assert "## Differences to model.decoder.core=" in report and "val_mss_mean" in report
    assert "## Reproducibility" in report and "| cache_manifest |" in report  # every trial recorded the same
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "report")} == {
        "report/s_report.md", "report/s_report.csv", "report/s_learning_curves.png"}
    again = run_study(study, verbose=0)  # the same file again continues the finished study: nothing reruns
    assert not again.interrupted and again.counts == {"FINISHED": 2}
    assert len(child_runs(study)[2]) == 2
    changed = load_study(path, ["run.train.epochs=5"])
    with pytest.raises(StudyConfigError, match=r"different study file \(run.train.epochs differ\)"):
        run_study(changed, verbose=0)


@pytest.mark.slow
def test_optuna_with_asha_stops_a_trial_early(ray_local, synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 4}}, concurrency=1,
                       search={"algorithm": "optuna", "samples": 5,
                               "space": {"train.lr": {"loguniform": [1e-7, 3e-3]}}},
                       scheduler={"kind": "asha", "grace_epochs": 1, "reduction_factor": 2})
    study = load_study(path)
    results = run_study(study, verbose=0).results
    iterations = sorted(r.metrics["training_iteration"] for r in results)
    assert len(iterations) == 5 and iterations[0] < 4 and iterations[-1] == 4
    client, _, children = child_runs(study)
    assert len(children) == 5 and not [r for r in children if r.info.status == "RUNNING"]
    epochs = {r.metrics["trial_id"]: int(r.metrics["epochs_done"]) for r in results}
    for run in children:  # stopped early by ASHA: KILLED, saying so; trained every epoch: FINISHED
        decided_on = epochs[run.data.tags["trial_id"]]
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "val_mss_mean")]
        # every epoch Tune saw is in the record, in order; the worker may have finished one more before
        # the stop reached it, never one it did not commit
        assert sorted(logged) == list(range(len(logged))) and len(logged) >= decided_on
        if len(logged) < 4:
            assert run.info.status == "KILLED" and run.data.tags["ended_by"] == "scheduler", run.data.tags
            assert run.data.tags["stopped_reason"] == \
                f"stopped by the asha scheduler on its result of epoch {decided_on} of 4"
            # its workers were stopped: a Ray task logged its artifacts, then ended the run
            assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
            assert run.data.tags["artifacts"] == "logged"
        else:
            assert run.info.status == "FINISHED" and "stopped_reason" not in run.data.tags
    assert (tmp_path / "studies" / "s" / "optuna.db").is_file()
    report = write_report(study)
    assert (report.parent / "s_optuna_history.png").stat().st_size > 5000
    assert (report.parent / "s_optuna_importance.png").stat().st_size > 5000


@pytest.mark.parametrize("logged,status,reason", [
    (2, "KILLED", "stopped by the asha scheduler on its result of epoch 1 of 4"),
    (4, "FINISHED", None)])
def test_a_trial_run_records_the_epochs_its_worker_logged_after_the_stop(tmp_path, synth_cache, logged, status,
                                                                         reason):
    """Tune stops a trial on a result while the worker, not waiting, trains and logs on: the run
    ends on what was logged, and once ended a worker sees it is no longer running."""
    from types import SimpleNamespace

    from diffcraft.study.outcome import end_trial_run
    from diffcraft.study.record import StudyRecord
    from diffcraft.study.tracking import TrialRun

    study = load_study(write_study(tmp_path, synth_cache, run={"train": {"epochs": 4}},
                                   scheduler={"kind": "asha", "grace_epochs": 1, "reduction_factor": 2}))
    record = StudyRecord.open(study)
    run = TrialRun.open(record.tracking_uri, record.experiment_id, record.parent_run_id, "t1", {}, {})
    for epoch in range(logged):
        run.log_epoch({"epoch": epoch, "epoch_seconds": 0.1, "val_mss_mean": 1.0})
    assert run.is_running()
    assert end_trial_run(study, record, SimpleNamespace(trial_id="t1", last_result={"epochs_done": 1})) == status
    assert not run.is_running()
    tags = run.client.get_run(run.run_id).data.tags
    assert tags.get("stopped_reason") == reason


@pytest.mark.slow
def test_a_failing_trial_fails_alone(ray_local, synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, search={"algorithm": "grid", "space": {
        "train.lr": {"grid": [1e-3, 1e12]}}})
    study = load_study(path)
    results = run_study(study, verbose=0).results
    assert len(results) == 2 and len(results.errors) == 1
    _, _, children = child_runs(study)
    by_lr = {r.data.params["train.lr"]: r for r in children}
    assert by_lr["0.001"].info.status == "FINISHED"
    failed = by_lr["1000000000000.0"]
    assert failed.info.status == "FAILED" and "FloatingPointError" in failed.data.tags["error"]


def test_unschedulable_trial_fails_fast_with_the_numbers_and_leaves_nothing(ray_local, synth_cache, tmp_path):
    study = load_study(write_study(tmp_path, synth_cache, resources={"cpus_per_worker": 64}))
    with pytest.raises(StudyConfigError, match=r"one worker needs 64 CPU and 0 GPU on one node, and no node has that"):
        run_study(study, verbose=0)
    # refused before its first trial: no record, lease or parent run, so the corrected file simply runs
    assert not study.location.exists() or sorted(study.location.list_info()) == []
    assert MlflowClient(study.mlflow.tracking_uri).get_experiment_by_name(study.name) is None
    corrected = load_study(write_study(tmp_path, synth_cache, resources={"cpus_per_worker": 1}))
    refuse_before_starting(corrected, None, resume=False, take_over=False)


@pytest.mark.parametrize("fields,message", [
    ({"search": {"algorithm": "bayes"}}, "search.algorithm: 'bayes'"),
    ({"search": {"space": {"model.decoder.kore": {"grid": ["gru"]}}}}, "search.space.model.decoder.kore"),
    ({"search": {"space": {"train.lr": {"loguniform": [0.0, 1.0]}}}}, "search.space.train.lr.loguniform"),
    ({"search": {"space": {"train.lr": {"normal": [0, 1]}}}}, "search.space.train.lr: 'normal'"),
    ({"search": {"space": {"train.epochs": {"int": [1.5, 3]}}}}, "search.space.train.epochs.int"),
    ({"search": {"algorithm": "optuna", "space": {"train.lr": {"grid": [0.1]}}}}, "grid needs algorithm"),
    ({"search": {"algorithm": "optuna", "seeds": 3}}, "search.seeds"),
    ({"search": {"samples": 0}}, "search.samples"),
    ({"objective": {"metric": "val_mss_mean", "mode": "lowest"}}, "objective.mode: 'lowest'"),
    ({"objective": {"metric": "loss"}}, "objective.metric: 'loss'"),
    ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind: 'hyperband'"),
    ({"resources": {"cpus_per_worker": 0}}, "resources"),
    ({"resources": {"worker_start_timeout_s": 0}}, "resources.worker_start_timeout_s: must be > 0"),
    ({"resources": {"controller_failure_limit": -2}}, "resources.controller_failure_limit: must be >= 0, or -1"),
    ({"concurrency": 0}, "concurrency"),
    ({"collapse_guard": {"action": "warn"}}, "collapse_guard"),
    ({"run": {"train": {"epochs": "many"}}}, "run.train.epochs: expected an integer, got 'many'"),
    ({"bogus": 1}, "unknown field bogus"),
    ({"name": "bad name!"}, "name: 'bad name!'"),
    ({"storage": "s3://"}, "storage: s3://: no bucket"),
    ({"storage": "ftp://host/x"}, "storage: ftp://host/x: unsupported storage scheme"),
    ({"optuna": {"storage": "postgresql://u:hunter2@db/optuna"}}, "optuna.storage: holds the password in the URL"),
    ({"mlflow": {"tracking_uri": "https://u:hunter2@mlflow.example"}}, "mlflow.tracking_uri: holds the password"),
])
def test_every_invalid_study_field_is_named(tmp_path, fields, message):
    path = write_study(tmp_path, tmp_path / "cache", **fields)
    with pytest.raises(StudyConfigError) as info:
        load_study(path)
    assert message in str(info.value) and "study.yaml" in str(info.value)


@pytest.mark.slow
def test_study_logs_to_a_real_mlflow_tracking_server(ray_local, synth_cache, tmp_path):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)
        path = write_study(tmp_path, synth_cache, mlflow={"tracking_uri": uri, "experiment": "served"},
                           run={"train": {"epochs": 1}})
        study = load_study(path)
        run_study(study, verbose=0)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("served")
        runs = client.search_runs([exp.experiment_id], "tags.trial_id != ''")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert "val_mss_mean" in runs[0].data.metrics
        assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoint")}
        assert list((tmp_path / "server-artifacts").rglob("best.pt"))  # uploaded through the server
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


SHIPPED = sorted(p.stem for p in (Path(__file__).parent.parent / "studies").glob("*.yaml"))
DEMOS = {"quickstart"}  # a first look, not a comparison: one seed


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_studies_validate(name):
    study = load_study(Path(__file__).parent.parent / "studies" / f"{name}.yaml")
    assert study.name == name and study.search.space


@pytest.mark.parametrize("name", sorted(set(SHIPPED) - DEMOS))
def test_shipped_comparisons_repeat_every_configuration_over_five_seeds_or_more(name):
    """The seed is the unit of the report's statistics: fewer than five leave intervals too wide to
    read (three seeds: 2 degrees of freedom, ± 4.3 SE). An Optuna search repeats no configuration."""
    study = load_study(Path(__file__).parent.parent / "studies" / f"{name}.yaml")
    assert study.search.algorithm == "optuna" or study.search.seeds >= 5


@pytest.mark.slow
def test_a_two_worker_ray_train_trial_runs_on_cpu(ray_local, synth_cache, tmp_path):
    path = write_study(tmp_path, synth_cache, resources={"workers": 2, "cpus_per_worker": 0.5},
                       run={"data": {"clips_per_epoch": 8, "batch_size": 4}}, concurrency=1)
    study = load_study(path)
    results = run_study(study, verbose=0).results
    assert not results.errors and results[0].metrics["training_iteration"] == 2
    client, _, children = child_runs(study)
    run = children[0]
    assert run.info.status == "FINISHED" and run.data.tags["workers"] == "2"
    for key in run.data.metrics:  # only rank 0 logs: one value per epoch of every metric
        if key.startswith("test_") or key.startswith(("n_parameters", "seconds_per_epoch")):
            continue  # scored once, at the selected checkpoint
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    spread = client.get_metric_history(run.info.run_id, "rank_weight_spread")
    assert [m.step for m in spread] == [0, 1] and all(m.value == 0.0 for m in spread)  # the ranks agree exactly
    from diffcraft.train.checkpoint import load_checkpoint

    trial_dir = next((tmp_path / "studies" / "s" / "train").iterdir())
    latest = max(trial_dir.glob("checkpoint_*/state.pt"), key=lambda p: load_checkpoint(p)["epoch"])
    state = load_checkpoint(latest)
    assert state["step"] == 2 * 2  # 8 clips per epoch, global batch 4 = 2 ranks x 2: 2 steps per epoch


def test_three_workers_of_one_cpu_each_do_not_fit_two_cpus(ray_local, synth_cache, tmp_path):
    study = load_study(write_study(tmp_path, synth_cache, resources={"workers": 3, "cpus_per_worker": 1},
                                   run={"data": {"batch_size": 3}}))
    with pytest.raises(StudyConfigError, match=r"one trial needs 3 CPUs"):
        run_study(study, verbose=0)


@pytest.mark.slow
def test_study_run_exits_non_zero_when_a_trial_failed(synth_cache, tmp_path):
    import subprocess
    import sys

    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 1}},
                       search={"algorithm": "grid", "space": {"train.lr": {"grid": [1e-3, 1e12]}}})
    done = subprocess.run([sys.executable, "-m", "diffcraft.cli", "study", "run", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 trial(s) failed" in done.stderr and "2 trials (1 failed, 1 finished)" in done.stdout
    finished = [r for r in child_runs(load_study(path))[2] if r.info.status == "FINISHED"]
    assert finished[0].data.tags["repro.command"] == f"diffcraft study run {path}"  # the driver's, in the worker


@pytest.mark.slow
def test_sigterm_ends_the_study_run_killed_and_resume_finishes_it(synth_cache, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = write_study(tmp_path, synth_cache, concurrency=1,
                       search={"algorithm": "grid", "space": {"model.decoder.core": {"grid": ["gru", "mamba"]}}})
    study = load_study(path)
    proc = subprocess.Popen([sys.executable, "-m", "diffcraft.cli", "study", "run", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            client, _, children = child_runs(study)
            if children and client.get_metric_history(children[0].info.run_id, "val_mss_mean"):
                break
        except Exception:  # noqa: BLE001 - the experiment is not created yet
            pass
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)  # the driver alone, as a scheduler or `kill` would
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    _, parents, children = child_runs(study)
    assert parents[0].info.status == "KILLED" and not [r for r in children if r.info.status == "RUNNING"]
    done = subprocess.run([sys.executable, "-m", "diffcraft.cli", "study", "run", str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # the same file again continues it
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, children = child_runs(study)
    assert parents[0].info.status == "FINISHED" and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mss_mean")) == [0, 1]


def _train_trial_again(study, run_id: str, storage, log):
    """The trial's Train run (same name, same storage), as a resumed study restarts it; every
    report that would reach Tune is appended to `log`."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.train import UserCallback

    from diffcraft.study.worker import train_worker

    class Reports(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(log, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    cfg = study.trial_config({})
    lease = acquire_lease(study.location, on_lost=print)  # the worker checks its study's lease
    try:
        TorchTrainer(train_worker, train_loop_config={"study": study, "cfg": cfg, "run_id": run_id, "lease": lease.ref,
                                                      "tracking_uri": study.mlflow.tracking_uri},
                     scaling_config=ray.train.ScalingConfig(num_workers=1),
                     run_config=ray.train.RunConfig(name="trial", storage_path=str(storage), callbacks=[Reports()])).fit()
    finally:
        lease.release()
    return [json.loads(line) for line in open(log)] if log.exists() else []


@pytest.mark.slow
def test_a_trial_restarted_after_its_last_epoch_tells_tune_its_final_result_again(ray_local, synth_cache, tmp_path):
    """A driver killed after the trial's last commit but before Tune heard of it: the resumed
    trial trains nothing, logs nothing twice (its artifacts neither: the first attempt's rank-0
    worker logged them), and reports the final result again (or Tune and the searcher would end the
    trial on an older one)."""
    from diffcraft.study.checkpoints import train_location

    study = load_study(write_study(tmp_path, synth_cache))
    client = MlflowClient(study.mlflow.tracking_uri)
    run_id = client.create_run(client.create_experiment("direct")).info.run_id
    storage = train_location(study).local_path()
    first = _train_trial_again(study, run_id, storage, tmp_path / "first.jsonl")
    assert [r["epochs_done"] for r in first] == [1, 2]
    assert client.get_run(run_id).data.tags["artifacts"] == "logged"
    again = _train_trial_again(study, run_id, storage, tmp_path / "again.jsonl")
    assert len(again) == 1 and again[0]["epochs_done"] == 2
    assert again[0]["val_loss"] == pytest.approx(first[-1]["val_loss"])
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 1]
    assert len(client.get_metric_history(run_id, "test_mss_mean")) == 1


def test_optuna_suggestions_left_running_are_failed_once_the_study_ended(tmp_path, synth_cache):
    """A suggestion whose driver died before Tune recorded it never ends by itself."""
    import optuna

    from diffcraft.study.search import fail_orphan_suggestions, optuna_storage

    study = load_study(write_study(tmp_path, synth_cache, search={
        "algorithm": "optuna", "samples": 2, "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}))
    assert fail_orphan_suggestions(study) == []  # no Optuna study yet: nothing to do
    opt = optuna.create_study(study_name="s", storage=optuna_storage(study))
    done = opt.ask()
    opt.tell(done, 1.0)
    lost = opt.ask()
    assert fail_orphan_suggestions(study) == [lost.number]
    states = [t.state for t in optuna.load_study(study_name="s", storage=optuna_storage(study)).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


@pytest.mark.slow
def test_a_grid_study_runs_no_more_trials_at_once_than_its_concurrency(ray_local, synth_cache, tmp_path):
    """Tune applies max_concurrent_trials to Searchers only: a grid must be limited itself (trial
    processes reserve no CPU, so without the limit every trial starts and waits inside Train)."""
    study = load_study(write_study(tmp_path, synth_cache, concurrency=1, run={"train": {"epochs": 1}},
                                   search={"algorithm": "grid", "space": {"train.lr": {"grid": [1e-3, 2e-3, 3e-3]}}}))
    run_study(study, verbose=0)
    _, _, children = child_runs(study)
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    assert len(spans) == 3 and all(spans[i][1] <= spans[i + 1][0] for i in range(2)), spans


@pytest.mark.slow
def test_a_trial_whose_workers_do_not_start_in_time_fails_after_its_tries(ray_local, synth_cache, tmp_path):
    """resources.worker_start_timeout_s and controller_failure_limit reach Ray Train: while every
    CPU is held elsewhere (a placement group standing for trials of another study), a worker given
    one second to start does not, and with no try left the trial fails saying so."""
    from ray.util.placement_group import placement_group, remove_placement_group

    study = load_study(write_study(tmp_path, synth_cache, run={"train": {"epochs": 1}},
                                   resources={"worker_start_timeout_s": 1, "controller_failure_limit": 0}))
    held = placement_group([{"CPU": 2}])
    ray_local.get(held.ready(), timeout=60)
    try:
        results = run_study(study, verbose=0).results
    finally:
        remove_placement_group(held)
    assert len(results.errors) == 1
    (run,) = child_runs(study)[2]
    assert run.info.status == "FAILED", run.data.tags
    assert "worker group startup timed out after 1.0 seconds" in run.data.tags["error"], run.data.tags["error"]
