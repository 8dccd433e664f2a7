"""Connecting to Ray: a local Ray by default, a running cluster when an address is given."""
from __future__ import annotations

import os
from contextlib import contextmanager

from diffcraft.errors import ConfigError

# Where the object store is, passed from the driver's environment to every Ray worker through the
# job's runtime environment, and the command every trial records (`train.provenance`). Only
# endpoints, regions and that: Ray logs a runtime environment on every node and shows it in the
# Jobs API, so no credential travels this way.
FORWARDED_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "DIFFCRAFT_COMMAND",
                 "DIFFCRAFT_FAULT")  # the recovery tests' fault points (`study.faults`)
# A node's own identity and secrets, never forwarded: each node has them from its platform (instance
# profile, service account, workload identity, a Kubernetes Secret, an env file read before
# `ray start`; cluster/README.md). Forwarding a laptop's AWS_PROFILE or credentials file path
# would also break the node's own identity. DIFFCRAFT_SCRATCH is a node's own setting as well.
NODE_OWN_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_TRACKING_TOKEN", "PGPASSWORD", "DIFFCRAFT_SCRATCH")


def forwarded_env(**extra: str) -> dict[str, str]:
    """The FORWARDED_ENV variables set here, plus `extra` (which must hold no NODE_OWN_ENV name)."""
    own = set(extra) & set(NODE_OWN_ENV)
    if own:
        raise ValueError(f"{sorted(own)}: a node's own settings are never forwarded")
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
