"""A trial's Ray Train checkpoints in the study's storage: where they live, what a checkpoint
folder holds, and which one is best by the objective."""
from __future__ import annotations

import json

from diffcraft.storage import Location
from diffcraft.study.config import StudyConfig

STATE_FILE = "state.pt"  # a checkpoint folder: the full training state ...
METRICS_FILE = "metrics.json"  # ... and its epoch's metrics, read without loading the state


def train_location(study: StudyConfig) -> Location:
    """Where every trial's Ray Train run keeps its checkpoints: <study>/train/<trial id>/."""
    return study.location / "train"


def best_checkpoint(study: StudyConfig, trial_id: str) -> tuple[Location, dict] | None:
    """The trial's kept checkpoint that is best by the objective: (folder, its reported metrics)."""
    folder = train_location(study) / trial_id
    found = []
    for rel in folder.list_info():
        if rel.endswith("/" + METRICS_FILE):
            name = rel.rsplit("/", 1)[0]
            metrics = json.loads((folder / rel).read_text() or "{}")
            if study.objective.metric in metrics and (folder / name / STATE_FILE).exists():
                found.append((folder / name, metrics))
    if not found:
        return None
    return study.objective.best(found, key=lambda item: item[1][study.objective.metric])
