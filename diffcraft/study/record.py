"""The study's record in its storage location, `study.json`: the study file as started, and its
MLflow experiment and parent run. Written once when the study starts; every later command (resume,
status, report, promote) finds the study through it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from diffcraft.errors import ConfigError, StudyConfigError
from diffcraft.storage import Location
from diffcraft.model_uri import default_tracking_uri
from diffcraft.study.config import StudyConfig
from diffcraft.study.tracking import create_study_run
from diffcraft.typed_yaml import flatten, from_dict

STUDY_FILE = "study.json"


@dataclass
class StudyRecord:
    name: str
    tracking_uri: str  # the study's MLflow, as an absolute URI every node can use
    experiment_id: str
    parent_run_id: str  # the study's own MLflow run; each trial's run is nested under it
    study: dict[str, Any]  # the study file as started (`StudyConfig.plain()`)
    created: float = 0.0  # when the study started (seconds since the epoch)

    @classmethod
    def load(cls, location: Location) -> "StudyRecord | None":
        """The record at `location`, or None when no study was started there."""
        path = location / STUDY_FILE
        text = path.read_text()
        if text is None:
            return None
        try:
            return from_dict(cls, json.loads(text))
        except (ValueError, ConfigError) as err:
            raise StudyConfigError(f"{path}: not a study record ({err})") from None

    @classmethod
    def started(cls, study: StudyConfig) -> "StudyRecord":
        """The record of `study`, or an error saying it has not been started."""
        record = cls.load(study.location)
        if record is None:
            raise StudyConfigError(f"{study.location}: study {study.name!r} has not been started")
        return record

    @classmethod
    def open(cls, study: StudyConfig) -> "StudyRecord":
        """The study's record: its MLflow experiment and parent run created the first time, read
        back after. Read again under the lease: a study file that differs from the one another
        driver started the study with a moment ago is refused too."""
        record = cls.load(study.location)
        if record is not None:
            record.refuse_another_file(study)
            return record
        uri = default_tracking_uri(study.mlflow.tracking_uri)
        experiment, parent = create_study_run(study, uri)
        record = cls(study.name, uri, experiment, parent, study.plain(), time.time())
        record.save(study.location)
        return record

    def save(self, location: Location) -> None:
        (location / STUDY_FILE).write_text(json.dumps(asdict(self), indent=1))

    def config(self) -> StudyConfig:
        """The study as it was started."""
        return from_dict(StudyConfig, self.study)

    def client(self):
        """An MLflow client of the study's tracking server."""
        from diffcraft.model_uri import tracking_client

        return tracking_client(self.tracking_uri)

    def refuse_another_file(self, study: StudyConfig) -> None:
        """A study name already used by a different study file is refused, saying what differs."""
        old, new = flatten(self.study), flatten(study.plain())
        differ = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        if differ:
            shown = [f"{k} was {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items())[:8]]
            raise StudyConfigError(
                f"{study.location}: study {study.name!r} exists and was started from a different study file "
                f"({', '.join(sorted(differ)[:8])}{' ...' if len(differ) > 8 else ''} differ): {'; '.join(shown)}. "
                f"Give this one another name, or continue the stored one with "
                f"`diffcraft study resume {study.name} --storage {study.storage}`")


def stored_study(name: str, storage: str = "studies") -> StudyConfig:
    """The StudyConfig saved when study `name` was started in `storage` (a folder or a URI)."""
    location = Location.of(storage) / name
    record = StudyRecord.load(location)
    if record is None:
        raise StudyConfigError(f"{location}: no study called {name!r} here")
    return record.config()
