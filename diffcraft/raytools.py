"""Connecting to Ray: a local Ray by default, a cluster when an address is given."""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, **init_kwargs):
    """Yield the `ray` module connected to `address` ('auto', 'ray://host:10001', or None for
    a fresh local Ray); an already-initialised Ray is reused and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(init_kwargs)
    if address in (None, "", "local"):
        kwargs.update(address="local", num_cpus=num_cpus or os.cpu_count())
    else:
        kwargs["address"] = address
    kwargs.setdefault("logging_level", "WARNING")
    kwargs.setdefault("configure_logging", True)
    ray.init(**kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
