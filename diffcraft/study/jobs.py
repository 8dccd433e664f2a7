"""Studies submitted to a Ray cluster as Ray Jobs: the driver runs on the cluster, so a laptop
can close its lid. The job carries the validated study file and this checkout's `diffcraft`
package (so the cluster runs the same code), and the store's endpoints (FORWARDED_ENV); never a
credential: the cluster's nodes have their own."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from diffcraft.errors import ConfigError, StudyConfigError
from diffcraft.raytools import forwarded_env
from diffcraft.study.config import StudyConfig
from diffcraft.study.tracking import require_server_for_cluster

PACKAGE = Path(__file__).resolve().parent.parent


def job_client(address: str):
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: the Ray Jobs API is the dashboard's HTTP address, "
                          "e.g. http://HEAD:8265")
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - connection and auth errors alike
        raise ConfigError(f"{address}: cannot reach the Ray Jobs API ({str(err).splitlines()[0]}); with token "
                          "authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see `ray get-auth-token`)") from None


def submit_command(address: str, args: list[str], study: StudyConfig | None = None, name: str = "diffcraft") -> str:
    """Submit `diffcraft ARGS` as a Ray Job (the study file, if given, travels as study.yaml)."""
    client = job_client(address)
    with tempfile.TemporaryDirectory() as tmp:
        if study is not None:
            (Path(tmp) / "study.yaml").write_text(yaml.safe_dump(study.plain(), sort_keys=False))
        runtime_env = {"working_dir": tmp, "py_modules": [str(PACKAGE)], "env_vars": forwarded_env(),
                       "excludes": ["__pycache__", "*.nbi", "*.nbc"]}
        submission_id = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return client.submit_job(entrypoint="python -m diffcraft.cli " + " ".join(args), runtime_env=runtime_env,
                                 submission_id=submission_id, metadata={"tool": "diffcraft", "name": name})


def submit_study(study: StudyConfig, address: str) -> str:
    """Submit `diffcraft study run` of a validated study; returns the submission id. Its storage
    and cache must be reachable from the cluster, its MLflow a tracking server."""
    require_server_for_cluster(study.mlflow.tracking_uri, address)
    for field, value in (("storage", study.storage), ("run.data.cache", study.run.data.cache)):
        if not value.startswith(("s3://", "gs://", "gcs://")):
            print(f"note: {field} is the path {value}: every cluster node must see it at that path (a shared mount)")
    if not study.name:
        raise StudyConfigError("name: a submitted study needs a name")
    return submit_command(address, ["study", "run", "study.yaml"], study, f"diffcraft-{study.name}")


def job_logs(address: str, submission_id: str, follow: bool = False) -> str:
    client = job_client(address)
    if not follow:
        return client.get_job_logs(submission_id)
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(submission_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return ""


def job_status(address: str, submission_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    status = job_client(address).get_job_status(submission_id)
    return getattr(status, "value", str(status))


def stop_job(address: str, submission_id: str) -> bool:
    return job_client(address).stop_job(submission_id)
