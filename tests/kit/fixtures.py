"""pytest fixtures of the kit, and the one rule for a missing prerequisite: a test that needs
mount namespaces or PostgreSQL skips, saying why, unless the run requires the cluster tests
(``DIFFCRAFT_REQUIRE_CLUSTER=1``, as ``.ci/run`` sets): then it fails."""
from __future__ import annotations

import os

import pytest

from tests.kit.processes import mount_namespaces_allowed
from tests.kit.ray_cluster import RayCluster
from tests.kit.services import MlflowServer, S3Server

REQUIRE_VAR = "DIFFCRAFT_REQUIRE_CLUSTER"


def unavailable(why: str):
    """Skip the calling test because `why`; fail it instead when the run requires the cluster
    and PostgreSQL tests (REQUIRE_VAR=1), so a missing prerequisite is never a silent skip."""
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{why} ({REQUIRE_VAR}=1: this run requires the cluster tests)", pytrace=False)
    pytest.skip(why)


def require_mount_namespaces_here() -> None:
    """`unavailable` unless private mount namespaces work here."""
    ok, why = mount_namespaces_allowed()
    if not ok:
        unavailable(f"mount namespaces are not allowed here: {why}")


@pytest.fixture
def require_mount_namespaces() -> None:
    """Skip (or fail, see `unavailable`) the test when private mount namespaces are not available."""
    require_mount_namespaces_here()


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session."""
    with S3Server() as s3:
        yield s3


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One MLflow server for the session (SQLite, local artifact folder, proxied artifacts)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server_s3(tmp_path_factory, s3_server):
    """One MLflow server for the session whose artifacts live in the session's S3 server."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow_s3"), s3=s3_server) as server:
        yield server


@pytest.fixture
def ray_cluster_factory(tmp_path, require_mount_namespaces):
    """``make(**RayCluster kwargs) -> started RayCluster`` (tmp_path defaults to the test's);
    every cluster made is stopped at teardown, and the test fails if a process of it survives."""
    made: list[RayCluster] = []

    def make(**kwargs) -> RayCluster:
        cluster = RayCluster(kwargs.pop("tmp_path", tmp_path), **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    leftovers = [line for c in reversed(made) for line in c.stop()]
    assert not leftovers, "processes of a test cluster survived its stop():\n" + "\n".join(leftovers)


@pytest.fixture(scope="session")
def shared_ray_cluster(tmp_path_factory, s3_server):
    """One head + 2 worker cluster for the whole session (start-up is paid once), with the
    session's S3 server in every node's environment. ``.launcher`` is a folder that only the head
    (and the test process) can see: use it as the launcher's working folder. Tests sharing it
    must not kill its workers (use ``ray_cluster_factory`` for that)."""
    require_mount_namespaces_here()
    launcher = tmp_path_factory.mktemp("launcher")
    cluster = RayCluster(tmp_path_factory.mktemp("ray"), head_cpus=1, workers=2, worker_cpus=1,
                         hidden=[launcher], env=s3_server.env)
    cluster.launcher = launcher
    with cluster:
        yield cluster
    assert not cluster.leftovers, "processes of the shared cluster survived:\n" + "\n".join(cluster.leftovers)
