"""The cluster kit: real multi-node Ray clusters, an S3 API server and an MLflow server, all on this
machine, for tests (see README.md here). Imported one way only: `from tests.kit import ...`.

Typical use::

    require_mount_namespaces_here()  # skips, or fails under DIFFCRAFT_REQUIRE_CLUSTER=1
    with S3Server() as s3, MlflowServer(tmp_path / "mlflow", s3=s3) as ml, \\
         RayCluster(tmp_path, workers=2, hidden=[tmp_path / "launcher"], env=s3.env) as cluster:
        proc = run_driver([sys.executable, "-m", "diffcraft.cli", ...],
                          env={**cluster.env, **ml.env}, timeout=300, cwd=tmp_path / "launcher")
"""
from tests.kit.fixtures import (REQUIRE_VAR, mlflow_server, mlflow_server_s3, ray_cluster_factory,
                                require_mount_namespaces, require_mount_namespaces_here, s3_server,
                                shared_ray_cluster, unavailable)
from tests.kit.processes import (ClusterKitError, free_port, kill_group, mount_namespaces_allowed,
                                 no_leftover_processes, read_output, run_driver, start_driver, wait_for_output)
from tests.kit.ray_cluster import RayCluster
from tests.kit.services import MlflowServer, S3Server

__all__ = [
    "ClusterKitError", "free_port", "mount_namespaces_allowed", "no_leftover_processes",
    "kill_group", "start_driver", "run_driver", "read_output", "wait_for_output",
    "S3Server", "MlflowServer", "RayCluster", "REQUIRE_VAR", "unavailable", "require_mount_namespaces_here",
    "require_mount_namespaces", "s3_server", "mlflow_server", "mlflow_server_s3", "ray_cluster_factory",
    "shared_ray_cluster",
]
