"""Studies on a real multi-node Ray cluster built on this machine (tests/kit): a head that
runs drivers only (no CPUs, as in production) and three worker nodes of one CPU whose mount
namespaces hide the launcher's folders, token auth on, the study's
storage and feature cache in a real S3 API server, MLflow on a real tracking server. Everything
the trials need must travel through Ray, S3 or MLflow; a hidden dependence on the launcher's disk
fails here."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from diffcraft.study.lease import LEASE_LOST_EXIT

from tests.kit import (MlflowServer, RayCluster, S3Server, kill_group, read_output, require_mount_namespaces_here,
                       run_driver, start_driver)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CLI = [sys.executable, "-m", "diffcraft.cli"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, synth_source):
    """S3 + MLflow server + a 3-node cluster; the synthetic source prepared into s3://bkt/cache."""
    require_mount_namespaces_here()
    tmp = tmp_path_factory.mktemp("cluster")
    launcher = tmp / "launcher"
    launcher.mkdir()
    with S3Server() as s3:
        s3.create_bucket("bkt")
        with MlflowServer(tmp / "mlflow") as mlflow_server, \
                RayCluster(tmp, head_cpus=0, workers=3, worker_cpus=1, hidden=[launcher, synth_source],
                           env=s3.env) as cluster:
            env = {**cluster.env, **s3.env, "RAY_DEDUP_LOGS": "0"}
            prepared = run_driver([*CLI, "data", "prepare", str(synth_source), "--out", "s3://bkt/cache",
                                   "--address", cluster.address], env=env, timeout=300, cwd=launcher)
            assert prepared.returncode == 0, prepared.stderr[-3000:]
            yield {"s3": s3, "mlflow": mlflow_server, "cluster": cluster, "env": env, "launcher": launcher}


def write_study(stack, name: str, epochs: int = 2, **fields) -> str:
    study = {"name": name, "storage": "s3://bkt/studies", "concurrency": 3, "max_retries": 2,
             "mlflow": {"tracking_uri": stack["mlflow"].uri},
             "run": {"data": {"cache": "s3://bkt/cache", "batch_size": 2, "clips_per_epoch": 4},
                     "model": {"decoder": {"core": "gru", "width": 16, "mlp_layers": 1, "n_harmonics": 8,
                                           "n_noise_bands": 9, "reverb_seconds": 0.05}},
                     "train": {"epochs": epochs, "lr": 1e-3}},
             "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [1e-3, 2e-3, 3e-3]}}}, **fields}
    path = stack["launcher"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return str(path)


def trial_runs(stack, name: str) -> list:
    client = MlflowClient(stack["mlflow"].uri)
    exp = client.get_experiment_by_name(name)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.trial_id != ''")


def assert_each_epoch_once(stack, runs, epochs: int) -> None:
    client = MlflowClient(stack["mlflow"].uri)
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mss_mean"))
        assert steps == list(range(epochs)), (run.data.tags.get("trial_id"), steps)


def test_trials_on_every_node_log_each_epoch_once(stack):
    done = run_driver([*CLI, "study", "run", write_study(stack, "spread")], env=stack["env"], timeout=420,
                      cwd=stack["launcher"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = trial_runs(stack, "spread")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["train_node"] for r in runs}) == 3  # one CPU per worker node: each trained one
    assert_each_epoch_once(stack, runs, 2)
    cluster = stack["cluster"]  # each worker staged the S3 cache onto its own disk; the head, running no trial, did not
    assert all(list((cluster.scratch(f"w{i}") / "caches").glob("*/manifest.json")) for i in range(3))
    assert not (cluster.scratch("head") / "caches").exists()
    # nor did the driver: the trials' workers scored their clips and drew their figures
    assert not (cluster.scratch("launcher") / "caches").exists()
    assert all(r.data.tags["artifacts"] == "logged" for r in runs)
    client = MlflowClient(stack["mlflow"].uri)
    assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id, "checkpoint")}
    status = run_driver([*CLI, "study", "status", "spread", "--storage", "s3://bkt/studies"], env=stack["env"],
                        timeout=120, cwd=stack["launcher"])
    assert status.returncode == 0 and "3 trials (3 finished)" in status.stdout, status.stderr[-2000:]


def test_a_killed_worker_node_costs_no_epoch(stack):
    cluster = stack["cluster"]
    driver = start_driver([*CLI, "study", "run", write_study(stack, "nodekill", epochs=6, concurrency=1,
                                                            search={"algorithm": "grid", "space": {}})],
                          env=stack["env"], cwd=stack["launcher"])
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and driver.poll() is None:
        time.sleep(1)
        runs = trial_runs(stack, "nodekill")
        if runs and "train_node" in runs[0].data.tags:
            node = runs[0].data.tags["train_node"]
            epochs = MlflowClient(stack["mlflow"].uri).get_metric_history(runs[0].info.run_id, "val_mss_mean")
            if len(epochs) >= 2:
                victim = node
    assert victim is not None, "the trial never logged two epochs"
    index = next(i for i in range(len(cluster.workers)) if cluster.node_id(f"w{i}") == victim)
    cluster.kill_worker(index)
    driver.wait(timeout=420)
    assert driver.returncode == 0, read_output(driver)[-4000:]
    (run,) = trial_runs(stack, "nodekill")
    assert run.info.status == "FINISHED" and run.data.tags["train_node"] != victim
    assert_each_epoch_once(stack, [run], 6)
    cluster.add_worker()  # back to three worker nodes for the tests that follow


def test_killed_drivers_resume_and_a_second_driver_is_refused(stack):
    path = write_study(stack, "drivers", epochs=4, concurrency=2)
    env, cwd = stack["env"], stack["launcher"]
    first = start_driver([*CLI, "study", "run", path], env=env, cwd=cwd)
    deadline = time.time() + 120
    while not trial_runs(stack, "drivers") and time.time() < deadline:
        time.sleep(0.5)
    second = run_driver([*CLI, "study", "run", path], env=env, timeout=120, cwd=cwd)
    assert second.returncode == 2 and "another driver is running this study" in second.stderr, second.stderr[-2000:]
    kill_group(first)  # killed during training
    first.wait()
    resumed = start_driver([*CLI, "study", "resume", "drivers", "--storage", "s3://bkt/studies"], env=env, cwd=cwd)
    time.sleep(3)  # killed again, before this driver's Tune loop has done anything
    kill_group(resumed)
    resumed.wait()
    done = run_driver([*CLI, "study", "resume", "drivers", "--storage", "s3://bkt/studies"], env=env, timeout=420,
                      cwd=cwd)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    runs = trial_runs(stack, "drivers")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert_each_epoch_once(stack, runs, 4)


def logged_epochs(stack, name: str) -> int:
    runs = trial_runs(stack, name)
    if not runs:
        return 0
    return len(MlflowClient(stack["mlflow"].uri).get_metric_history(runs[0].info.run_id, "val_mss_mean"))


def test_a_paused_driver_whose_study_was_taken_over_exits_without_writing(stack):
    """SIGSTOP a driver past its lease, take the study over, SIGCONT it: it stops, writing nothing
    (its workers stop too), and the driver that took over finishes every epoch once."""
    ttl = 8.0
    env, cwd = {**stack["env"], "DIFFCRAFT_LEASE_TTL_S": str(ttl)}, stack["launcher"]
    path = write_study(stack, "paused", epochs=12, concurrency=1, search={"algorithm": "grid", "space": {}})
    first = start_driver([*CLI, "study", "run", path], env=env, cwd=cwd)
    second = None
    try:
        deadline = time.time() + 420
        while logged_epochs(stack, "paused") < 1 and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert logged_epochs(stack, "paused") >= 1, read_output(first)[-3000:]
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(ttl + 2)  # its lease goes stale; its workers, finding it so, log nothing more
        stale_at = logged_epochs(stack, "paused")
        time.sleep(5)
        assert logged_epochs(stack, "paused") == stale_at < 12
        second = start_driver([*CLI, "study", "run", path, "--take-over"], env=env, cwd=cwd)
        deadline = time.time() + 120
        while "marked" not in read_output(second) and "Trial" not in read_output(second) and time.time() < deadline:
            time.sleep(0.5)  # the second driver holds the lease and has started its Tune run
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=60) == LEASE_LOST_EXIT, read_output(first)[-3000:]
        assert "this one stops" in read_output(first), read_output(first)[-3000:]
        assert second.wait(timeout=480) == 0, read_output(second)[-4000:]
    finally:
        for driver in (first, second):
            if driver is not None and driver.poll() is None:
                os.kill(driver.pid, signal.SIGCONT)
                kill_group(driver)
                driver.wait()
    (run,) = trial_runs(stack, "paused")  # one run for the trial, not one per driver
    assert run.info.status == "FINISHED"
    assert_each_epoch_once(stack, [run], 12)


def test_a_local_mlflow_store_with_a_cluster_address_is_refused_at_once(tmp_path):
    study = {"name": "local", "storage": str(tmp_path / "studies"),
             "run": {"data": {"cache": str(tmp_path / "cache")}}, "search": {"space": {}}}
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(study))
    started = time.time()
    done = run_driver([*CLI, "study", "run", str(path), "--address", "10.1.2.3:6379"], timeout=60, cwd=tmp_path)
    assert done.returncode == 2 and "is a local store" in done.stderr and "tracking server" in done.stderr
    assert time.time() - started < 30 and not (tmp_path / "studies").exists()


def test_cluster_check_names_each_node_that_cannot_read_the_cache(stack):
    env, cwd = stack["env"], stack["launcher"]
    good = run_driver([*CLI, "cluster", "check", "--study", write_study(stack, "check"), "--address",
                       stack["cluster"].address], env=env, timeout=300, cwd=cwd)
    assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-2000:]
    assert good.stdout.count("reads the cache, writes the storage, reaches MLflow") == 4  # head + 3 workers
    local_cache = stack["launcher"] / "cache"  # the launcher's disk: the worker nodes do not see it
    local_cache.mkdir()
    (local_cache / "manifest.json").write_text('{"files": {}}')
    bad = run_driver([*CLI, "cluster", "check", "--study", write_study(stack, "check"), "--address",
                      stack["cluster"].address, "--set", f"run.data.cache={local_cache}"],
                     env=env, timeout=300, cwd=cwd)
    assert bad.returncode == 1
    problems = [line for line in bad.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert len(problems) == 3 and all(f"finds no feature cache at {local_cache}" in p for p in problems), bad.stdout


CANARY = "canary-7f3e9b1c"  # a secret in the launcher's environment that must reach no node, log or store


def places_holding(stack, text: str, experiment: str) -> list[str]:
    """Every place a study's secret must not reach that holds `text`: files below any node's Ray
    folder (logs, session, runtime envs), Ray job records, the experiment's MLflow params, tags and
    artifacts, and the study's storage in S3."""
    import tempfile
    from pathlib import Path

    from ray.job_submission import JobSubmissionClient

    found = [str(p) for p in stack["cluster"].temp_root.rglob("*")
             if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]
    jobs = JobSubmissionClient(stack["cluster"].dashboard, headers=stack["cluster"].auth_headers).list_jobs()
    found += [f"job {job.submission_id}" for job in jobs if text in repr(job)]
    client = MlflowClient(stack["mlflow"].uri)
    for run in trial_runs(stack, experiment) + client.search_runs(
            [client.get_experiment_by_name(experiment).experiment_id], "tags.role = 'study'"):
        if text in repr(run.data.params) + repr(run.data.tags):
            found.append(f"MLflow run {run.info.run_id} params/tags")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(client.download_artifacts(run.info.run_id, "", tmp))
            found += [f"MLflow artifact {p.relative_to(local)}" for p in local.rglob("*")
                      if p.is_file() and text.encode() in p.read_bytes()]
    s3 = stack["s3"].client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bkt", Prefix=f"studies/{experiment}"):
        for item in page.get("Contents", []):
            if text.encode() in s3.get_object(Bucket="bkt", Key=item["Key"])["Body"].read():
                found.append(f"s3://bkt/{item['Key']}")
    return found


def test_a_study_submitted_as_a_ray_job_runs_on_the_cluster_and_no_secret_travels(stack):
    """The launcher's credentials stay on the launcher: the nodes use their own (tests/kit gives
    every node the S3 keys in its environment, as a platform identity would)."""
    cluster, cwd = stack["cluster"], stack["launcher"]
    env = {**stack["env"], "AWS_SESSION_TOKEN": CANARY, "PGPASSWORD": CANARY, "MLFLOW_TRACKING_TOKEN": CANARY,
           "GOOGLE_APPLICATION_CREDENTIALS": f"/home/{CANARY}/key.json"}
    path = write_study(stack, "submitted", epochs=1, search={"algorithm": "grid", "space": {}})
    submitted = run_driver([*CLI, "study", "submit", path, "--address", cluster.dashboard], env=env, timeout=120,
                           cwd=cwd)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.split()[1]
    followed = run_driver([*CLI, "study", "logs", job, "--address", cluster.dashboard, "--follow"], env=env,
                          timeout=480, cwd=cwd)  # returns when the job ends
    assert followed.returncode == 0 and f"[{job}: SUCCEEDED]" in followed.stdout, followed.stdout[-3000:]
    assert "1 trials (1 finished)" in followed.stdout
    (run,) = trial_runs(stack, "submitted")
    assert run.info.status == "FINISHED" and run.data.tags["artifacts"] == "logged"
    # the driver ran on the head as a Ray job: it staged no cache there and scored no clip
    assert not (cluster.scratch("head") / "caches").exists()
    assert places_holding(stack, CANARY, "submitted") == []
