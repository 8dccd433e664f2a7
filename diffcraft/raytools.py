"""Connecting to Ray: a local Ray by default, a running cluster when an address is given."""
from __future__ import annotations

import os
from contextlib import contextmanager

from diffcraft.errors import ConfigError

# Credentials and endpoints a trial may need, passed from the driver's environment to every Ray
# worker through the job's runtime environment (never written into study files, params or logs).
# DIFFCRAFT_SCRATCH is not among them: where a node stages caches is that node's own setting.
FORWARDED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                 "GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "PGPASSWORD",
                 "DIFFCRAFT_COMMAND")  # not a credential: the command every trial records (`train.provenance`)


def forwarded_env(**extra: str) -> dict[str, str]:
    """The FORWARDED_ENV variables set here, plus `extra`."""
    return {**{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}, **extra}


def is_local_address(address: str | None) -> bool:
    return address in (None, "", "local")


def check_address(address: str | None) -> None:
    if address and address.startswith("ray://"):
        raise ConfigError(f"--address {address}: Ray Client is not supported (Ray sends Tune and Train users to Jobs): "
                          "submit the study to the cluster with `diffcraft study submit FILE --address "
                          "http://HEAD:8265`, or run the driver on the cluster with --address auto")


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Yield the `ray` module connected to `address` ('auto', 'HOST:6379', or None for a fresh
    local Ray); an already-initialised Ray is reused and left running."""
    import ray

    check_address(address)
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(init_kwargs)
    if is_local_address(address):
        kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count())
    else:
        kwargs["address"] = address
    # Inside a Ray Job the job's runtime environment (the submitted package, the forwarded variables)
    # is combined with the driver's instead of refusing the overlap.
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    kwargs.setdefault("logging_level", "WARNING")
    kwargs.setdefault("configure_logging", True)
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
