"""Shared fixtures: small real audio, one local Ray for the session."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)


def sine(freq_hz: float, seconds: float, amplitude: float = 0.5, sample_rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by every test that needs one. Its node has its own
    credentials for the tests' S3 servers (moto accepts any), as a cluster node has from its
    platform: no credential crosses a job's runtime environment (`diffcraft.raytools`)."""
    import ray

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    ray.init(address="local", num_cpus=2, logging_level="ERROR", include_dashboard=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory):
    """A small synthetic MDB-stem-synth tree: 4 songs x 1 stem x 9 s."""
    from diffcraft.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), n_songs=4, stems_per_song=1, seconds=9.0, seed=7)


@pytest.fixture(scope="session")
def synth_cache(ray_local, synth_source, tmp_path_factory):
    """The synthetic source prepared into a feature cache (4 songs: 2 train, 1 validation, 1 test)."""
    from diffcraft.data.prepare import prepare

    cache = tmp_path_factory.mktemp("cache")
    prepare(synth_source, cache, progress=False)
    return cache


def tiny_run_config(cache, out_dir, **train):
    """A run config small enough for a few CPU seconds per epoch."""
    from diffcraft.typed_yaml import from_dict
    from diffcraft.train.config import RunConfig

    return from_dict(RunConfig, {
        "name": "tiny", "out_dir": str(out_dir),
        "data": {"cache": str(cache), "batch_size": 2, "clips_per_epoch": 4},
        "model": {"decoder": {"core": "gru", "width": 32, "mlp_layers": 1, "n_harmonics": 16,
                              "n_noise_bands": 17, "reverb_seconds": 0.1}},
        "train": {"epochs": 2, "lr": 1e-3, **train},
    })
