"""The cluster harness itself: a real 3-node Ray cluster without a shared filesystem, a moto S3
server and an MLflow server, all on this machine (see tests/kit/README.md).

One cluster (head + 2 workers) and the two servers are shared by the tests of this module and
stopped by the last one, which checks that nothing of them survives.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.kit import (ClusterKitError, MlflowServer, RayCluster, S3Server, kill_group, no_leftover_processes,
                       require_mount_namespaces_here, run_driver, start_driver, wait_for_output)
from tests.kit.processes import _http

pytestmark = pytest.mark.cluster

SECRET = "launcher-only.txt"


def _result(proc) -> dict:
    """The JSON a driver printed after 'RESULT ' (Ray may write a worker's log line into the same
    line of the driver's stdout before its newline: what follows the JSON is not part of it)."""
    assert proc.returncode == 0, f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.JSONDecoder().raw_decode(line[len("RESULT "):])[0]
    raise AssertionError(f"no RESULT line:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _python(script: str, *args, env: dict, cwd=None, timeout: float = 150):
    return run_driver([sys.executable, "-c", script, *map(str, args)], env=env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def ns_ok():
    require_mount_namespaces_here()


@pytest.fixture(scope="module")
def s3(ns_ok):
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def mlflow_srv(s3, tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3=s3, bucket="mlflow", prefix="artifacts")
    server.start(wait=False)  # gets ready while the Ray cluster starts; tests call wait_ready()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """The launcher's working folder: on the head only; worker nodes get an empty tmpfs there."""
    d = tmp_path_factory.mktemp("launcher")
    (d / SECRET).write_text("only the launcher machine has this")
    return d


def _token_file_digest():
    p = Path.home() / ".ray" / "auth_token"
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None


@pytest.fixture(scope="module")
def cluster(ns_ok, s3, mlflow_srv, launcher, tmp_path_factory):
    before = _token_file_digest()
    c = RayCluster(tmp_path_factory.mktemp("ray"), head_cpus=1, workers=2, worker_cpus=1,
                   hidden=[launcher], env=s3.env)
    with c:
        print(f"\nclusterkit: head + 2 workers ready in {c.startup_seconds:.1f}s")
        yield c
    assert _token_file_digest() == before, "~/.ray/auth_token was changed"


VIEW = r"""
import json, os, sys, ray
ray.init(logging_level="ERROR")
path = sys.argv[1]

@ray.remote(num_cpus=0.01)
def view(path, write):
    import os, ray
    out = {"node_id": ray.get_runtime_context().get_node_id(),
           "listing": sorted(os.listdir(path)) if os.path.isdir(path) else None,
           "scratch": os.environ.get("DIFFCRAFT_SCRATCH")}
    if write:
        with open(os.path.join(path, "written-on-a-worker.txt"), "w") as f:
            f.write("x")
    return out

names = sys.argv[2].split(",")
refs = {n: view.options(resources={f"node_{n}": 0.01}).remote(path, n != "head") for n in names}
print("RESULT " + json.dumps({n: ray.get(r, timeout=90) for n, r in refs.items()}))
"""


def test_nodes_join_with_token_and_workers_do_not_see_hidden_folder(cluster, launcher):
    # token auth is on: the dashboard refuses a request without the cluster's token
    assert _http(cluster.dashboard + "/api/v0/nodes")[0] == 401
    assert _http(cluster.dashboard + "/api/v0/nodes", cluster.auth_headers)[0] == 200
    assert len(cluster.wait_nodes(3, timeout=30)) == 3

    # a driver on the "launcher machine" (cwd = the hidden folder), one task pinned to each node
    out = _result(_python(VIEW, launcher, "head,w0,w1", env=cluster.env, cwd=launcher))
    assert out["head"]["listing"] == [SECRET]
    assert out["w0"]["listing"] == [] and out["w1"]["listing"] == []
    ids = {n: out[n]["node_id"] for n in ("head", "w0", "w1")}
    assert len(set(ids.values())) == 3
    assert ids == {n: cluster.node_id(n) for n in ids}
    # each node stages caches into its own scratch folder, below the cluster's temp root, not in home
    assert {n: out[n]["scratch"] for n in ids} == {n: str(cluster.scratch(n)) for n in ids}
    assert all(cluster.scratch(n).is_relative_to(cluster.temp_root) for n in ids)
    assert cluster.env["DIFFCRAFT_SCRATCH"] == str(cluster.scratch("launcher"))
    # what the workers wrote there stayed on the workers
    assert sorted(os.listdir(launcher)) == [SECRET]


def test_jobs_api_on_dashboard_port(cluster):
    ray_exe = str(Path(sys.executable).with_name("ray"))
    proc = run_driver([ray_exe, "job", "submit", "--address", cluster.dashboard, "--",
                       sys.executable, "-c", "print('job-ran-' + str(6 * 7))"], env=cluster.env, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "job-ran-42" in proc.stdout
    assert "succeeded" in proc.stdout


S3_TASK = r"""
import json, ray
ray.init(logging_level="ERROR")

@ray.remote(num_cpus=0.01, resources={"node_w0": 0.01})
def roundtrip():
    import boto3, ray   # endpoint, keys and region come from the environment only
    s3 = boto3.client("s3")
    s3.put_object(Bucket="ck-test", Key="from-w0/hello.txt", Body=b"hello from w0")
    body = s3.get_object(Bucket="ck-test", Key="from-w0/hello.txt")["Body"].read().decode()
    return {"node_id": ray.get_runtime_context().get_node_id(), "body": body}

print("RESULT " + json.dumps(ray.get(roundtrip.remote(), timeout=90)))
"""


def test_worker_task_reads_and_writes_s3_from_env(cluster, s3):
    s3.create_bucket("ck-test")
    out = _result(_python(S3_TASK, env=cluster.env))
    assert out["node_id"] == cluster.node_id("w0")
    assert out["body"] == "hello from w0"
    got = s3.client().get_object(Bucket="ck-test", Key="from-w0/hello.txt")["Body"].read()
    assert got == b"hello from w0"


MLFLOW_TASK = r"""
import json, os, sys, ray
ray.init(logging_level="ERROR")

@ray.remote(num_cpus=0.01, resources={"node_w1": 0.01})
def log_run():
    import mlflow, ray
    assert "AWS_ENDPOINT_URL" in os.environ   # the node has S3 credentials, but must not need them
    mlflow.set_experiment("clusterkit")
    with mlflow.start_run(run_name="from-w1") as run:
        mlflow.log_param("node", ray.get_runtime_context().get_node_id())
        mlflow.log_metric("loss", 0.25, step=3)
        mlflow.log_text("artifact written on w1", "notes/w1.txt")
    return {"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri}

env = {"MLFLOW_TRACKING_URI": sys.argv[1]}
print("RESULT " + json.dumps(ray.get(log_run.options(runtime_env={"env_vars": env}).remote(), timeout=120)))
"""


def test_mlflow_run_from_worker_survives_server_restart(cluster, mlflow_srv, s3, tmp_path):
    mlflow_srv.wait_ready()
    out = _result(_python(MLFLOW_TASK, mlflow_srv.uri, env=cluster.env, timeout=180))
    assert out["artifact_uri"].startswith("mlflow-artifacts:")

    client = mlflow_srv.client()

    def check(label):
        run = client.get_run(out["run_id"])
        assert run.data.params["node"] == cluster.node_id("w1"), label
        assert run.data.metrics["loss"] == 0.25, label
        local = client.download_artifacts(out["run_id"], "notes/w1.txt", str(tmp_path / label))
        assert Path(local).read_text() == "artifact written on w1", label

    check("before")
    # the artifact really is in the bucket, proxied by the server
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(k.startswith("artifacts/") and k.endswith("notes/w1.txt") for k in keys), keys

    mlflow_srv.restart()
    print(f"\nclusterkit: mlflow server restarted in {mlflow_srv.restart_seconds:.1f}s")
    check("after-restart")


CHECK_NODES = r"""
import json, sys, ray
ray.init(logging_level="ERROR")
alive = sorted(k for n in ray.nodes() if n["Alive"] for k in n["Resources"] if k.startswith("node_"))

@ray.remote(num_cpus=0.01)
def where(path):
    import os, ray
    return [ray.get_runtime_context().get_node_id(), sorted(os.listdir(path))]

names = sys.argv[2].split(",")
out = {n: ray.get(where.options(resources={f"node_{n}": 0.01}).remote(sys.argv[1]), timeout=90) for n in names}
print("RESULT " + json.dumps({"alive": alive, "ran": out}))
"""


def test_kill_worker_then_add_worker(cluster, launcher):
    dead_after = cluster.kill_worker(0, timeout=60)
    print(f"\nclusterkit: worker w0 marked DEAD {dead_after:.1f}s after SIGKILL")
    assert dead_after < 30
    states = {n["node_id"]: n["state"] for n in cluster.nodes()}
    assert states[cluster.node_id("w0")] == "DEAD"
    assert states[cluster.node_id("w1")] == "ALIVE"

    t0 = time.monotonic()
    assert cluster.add_worker() == 2
    print(f"clusterkit: worker w2 joined in {time.monotonic() - t0:.1f}s")

    out = _result(_python(CHECK_NODES, launcher, "head,w1,w2", env=cluster.env))
    assert out["alive"] == ["node_head", "node_w1", "node_w2"]
    assert out["ran"]["head"] == [cluster.node_id("head"), [SECRET]]
    # w1 still has its own private copy of the folder (with what it wrote in the first test);
    # the new node starts with an empty one
    assert out["ran"]["w1"][0] == cluster.node_id("w1")
    assert set(out["ran"]["w1"][1]) <= {"written-on-a-worker.txt"}  # = when the first test ran
    assert out["ran"]["w2"] == [cluster.node_id("w2"), []]


def test_everything_stops_without_leftovers(cluster, mlflow_srv, s3):
    # a driver that would run forever, killed by its process group
    drv = start_driver([sys.executable, "-c",
                        "import ray, time; ray.init(logging_level='ERROR'); print('connected', flush=True); time.sleep(600)"],
                       env=cluster.env)
    try:
        wait_for_output(drv, "connected", timeout=90)
    finally:
        kill_group(drv)
        drv.wait(timeout=10)
    assert drv.returncode == -9

    assert cluster.processes(), "the cluster should be running here"
    temp_root = cluster.temp_root
    assert cluster.stop() == []
    assert no_leftover_processes(cluster) == []
    assert no_leftover_processes(cluster.marker) == []
    assert not temp_root.exists()
    for server in (mlflow_srv, s3):
        assert server.stop() == []
        assert no_leftover_processes(server) == []


def _bound_not_listening() -> socket.socket:
    """A port that a connect() finds closed but that nobody else can bind: the harness's own
    pre-check passes, so the started process itself must fail and be reported."""
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    return s


def test_start_failure_is_clear_and_cleans_up(ns_ok, tmp_path):
    # a port that is visibly in use: refused before anything starts
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ClusterKitError, match=f"port {port} is already in use"):
            RayCluster(tmp_path, workers=1, port=port).start()
        with pytest.raises(ClusterKitError, match=f"port {port} is already in use"):
            S3Server(port=port).start()

    # Ray's GCS cannot bind its port: Ray itself would retry for about a minute; the harness
    # reads the failure from the GCS log, stops the head and says why
    with _bound_not_listening() as busy:
        port = busy.getsockname()[1]
        c = RayCluster(tmp_path, workers=1, port=port)
        t0 = time.monotonic()
        with pytest.raises(ClusterKitError, match="Ray node head failed while starting: gcs_server"):
            c.start()
        print(f"\nclusterkit: GCS port clash reported in {time.monotonic() - t0:.1f}s")
        assert time.monotonic() - t0 < 30
    assert no_leftover_processes(c) == []
    assert not c.temp_root.exists()

    # the S3 server cannot bind: it exits, and the error carries its log
    with _bound_not_listening() as busy:
        s3 = S3Server(port=busy.getsockname()[1], log_dir=tmp_path / "s3")
        with pytest.raises(ClusterKitError, match="s3 exited with code"):
            s3.start()
    assert no_leftover_processes(s3) == []
