"""Where a training run lives: its device, its rank among data-parallel workers, and how its
checkpoints persist. The loop (`train.loop.train`) is the same everywhere; a session says where.

`LocalSession` is a run on this machine with checkpoints in `run_dir/checkpoints/` (what
`diffcraft train` uses). The study layer's Ray Train session (`study.worker.RayTrainSession`)
gives each worker its device, wraps the model for data parallelism and persists through Ray's
checkpoint API.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint


RUN_RECORD = "run_record.json"  # a local run's `Session.record`: how it trains and how to reproduce it


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Session:
    """The contract a run's surroundings fulfil; this base is one process with no persistence."""

    rank, world = 0, 1
    where = "memory"  # what a person calls this run in messages

    def __init__(self, device: torch.device):
        self.device = device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls (moved to the device, wrapped for data parallelism)."""
        return model.to(self.device)

    def restore(self) -> dict | None:
        """What the last committed epoch's checkpoint holds, on the CPU (`stopped` set when the run must not
        go on), or None for a fresh run."""
        return None

    def commit(self, saved: dict | None, metrics: dict, improved: bool) -> bool:
        """Persist an epoch (rank 0 passes what the checkpoint holds and the metrics; other ranks
        None and {}) and return whether the run stops here, the same answer on every rank."""
        return False

    def record(self, **tags: str) -> None:
        """Note facts about how the run trains (e.g. the Mamba scan in use) where its record lives."""

    def share(self, value: float) -> float:
        """Rank 0's value, on every rank (a collective: every rank calls it)."""
        return value

    def describe(self) -> str:
        return f"run {self.where}"


class LocalSession(Session):
    """A run on this machine: `last.pt` every epoch and `best.pt` when it improved, written
    atomically; `on_epoch(metrics, last_path)` after each commit may return True to stop."""

    def __init__(self, run_dir: Path, device: torch.device,
                 on_epoch: Callable[[dict, Path], bool | None] | None = None):
        super().__init__(device)
        self.run_dir, self.on_epoch = Path(run_dir), on_epoch
        self.checkpoints = self.run_dir / "checkpoints"
        self.where = str(self.run_dir)

    def record(self, **tags: str) -> None:
        """Kept beside the checkpoints in run_record.json (merged: a resumed run notes its own attempt)."""
        path = self.run_dir / RUN_RECORD
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**old, **{k: str(v) for k, v in tags.items()}}, indent=1, sort_keys=True))

    def restore(self) -> dict | None:
        last = self.checkpoints / "last.pt"
        return load_checkpoint(last) if last.is_file() else None

    def commit(self, saved: dict | None, metrics: dict, improved: bool) -> bool:
        if improved:
            save_checkpoint(self.checkpoints / "best.pt", saved)
        last = save_checkpoint(self.checkpoints / "last.pt", saved)
        return bool(self.on_epoch(metrics, last)) if self.on_epoch else False

    def describe(self) -> str:
        return f"run {self.where}, checkpoints in {self.checkpoints}"
