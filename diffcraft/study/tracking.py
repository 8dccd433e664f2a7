"""MLflow bookkeeping for studies: one experiment per study, a parent run for the study, one
nested run per trial that is reused (never duplicated) when the trial restarts or the study resumes.
"""
from __future__ import annotations

import math
import subprocess
import tempfile
import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from diffcraft import __version__
from diffcraft.errors import StudyConfigError
from diffcraft.model_uri import tracking_client
from diffcraft.raytools import is_local_address
from diffcraft.train.names import EPOCH, EPOCH_SECONDS, KL_PER_DIM, VAL
from diffcraft.typed_yaml import flatten

MAX_PARAMS_PER_BATCH = 100
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI picks an experiment's view from this tag ...
MODEL_TRAINING = "custom_model_development"  # ... this value opens the runs table (else: the GenAI overview)
NOTE = "mlflow.note.content"  # a run's description in the UI (markdown)


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def require_server_for_cluster(uri: str, address: str | None) -> None:
    """A study on a remote cluster needs a tracking server every node reaches: a local SQLite
    file or folder exists only on the launching machine."""
    if is_local_address(address) or not _is_local(uri or "sqlite:"):
        return
    raise StudyConfigError(
        f"mlflow.tracking_uri: {uri or '(default: ./mlflow.db)'} is a local store, but --address {address} runs "
        "the trials on a cluster whose nodes cannot write it. Start a tracking server that every node reaches "
        "(`mlflow server --backend-store-uri postgresql://... --serve-artifacts --artifacts-destination s3://...`, "
        "see cluster/README.md) and set mlflow.tracking_uri: http://HOST:5000")


def code_version() -> str:
    """diffcraft's version plus the git commit of its checkout, when there is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment called `name`, created if needed. With a local store, artifacts go to an
    absolute folder next to the database (MLflow would otherwise use the creator's cwd)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if _is_local(tracking_uri):
        db = Path(tracking_uri.split(":///", 1)[-1]) if "://" in tracking_uri else Path(tracking_uri)
        location = (db.parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def create_study_run(study, tracking_uri: str) -> tuple[str, str]:
    """(experiment id, parent run id) of a study starting now: its experiment (found or
    created) and a new parent run holding the study file."""
    client = tracking_client(tracking_uri)
    experiment = experiment_id(client, study.mlflow.experiment or study.name, tracking_uri)
    parent = client.create_run(experiment, run_name=f"study {study.name}",
                               tags={"study": study.name, "role": "study", "code_version": code_version(),
                                     "search": study.search.algorithm, "scheduler": study.scheduler.kind})
    client.log_dict(parent.info.run_id, study.plain(), "study.yaml")
    return experiment, parent.info.run_id


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment for MLflow's model-training view, unless someone chose another view."""
    if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)


def ui_link(record, ui: str = "http://127.0.0.1:5000") -> str:
    """The study's runs table in the MLflow UI (`ui`: where `mlflow ui` serves a local store; a
    tracking server serves its own). MLflow 3.17's UI opens an experiment on the GenAI overview
    unless the link asks for the model-training view."""
    uri = record.tracking_uri
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return f"{base}/#/experiments/{record.experiment_id}/runs?workflowType=machine_learning"


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """Finite numbers of an epoch's metrics, list-valued ones spread as name_0, name_1, ..."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and key == VAL + KL_PER_DIM:
            out.update({f"{key}_{i}": float(v) for i, v in enumerate(value) if math.isfinite(v)})
    return out


def trial_runs(client: MlflowClient, record) -> list:
    """The MLflow runs of a study's trials (the children of its parent run; `record`: its
    `StudyRecord`)."""
    return client.search_runs([record.experiment_id], f"tags.mlflow.parentRunId = '{record.parent_run_id}'",
                              max_results=10000)


def metric_at(client: MlflowClient, run_id: str, key: str, step: int) -> float | None:
    """A run's value of `key` at `step` (an epoch logged twice after a resume: the last one)."""
    values = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
    return values[-1] if values else None


def find_trial_run(client: MlflowClient, experiment: str, parent_run_id: str, trial_id: str) -> list:
    """The run of trial `trial_id` among the children of the study's parent run ([] or [run]):
    another study logging to the same experiment can have a trial of the same id."""
    return client.search_runs([experiment], f"tags.trial_id = '{trial_id}' and "
                                            f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1)


class TrialRun:
    """The MLflow run of one trial."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, parent_run_id: str, trial_id: str, tags: dict,
             params: dict, run_name: str = "") -> "TrialRun":
        """Reuse the trial's run (found by its trial_id tag under the study's parent run: a restarted
        trial keeps its run) or create it, named `run_name` (default: the trial's name)."""
        client = tracking_client(tracking_uri)
        found = find_trial_run(client, experiment, parent_run_id, trial_id)
        run_id = found[0].info.run_id if found else None
        if run_id is None:
            tags = {"mlflow.parentRunId": parent_run_id, "trial_id": trial_id, **tags}
            run = client.create_run(experiment, run_name=run_name or str(tags.get("trial_name", trial_id)),
                                    tags={k: str(v) for k, v in tags.items()})
            run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=items[i: i + MAX_PARAMS_PER_BATCH])
        else:  # a retry or a resume: what ended the last attempt is history, not this attempt's outcome
            old = found[0].data.tags
            client.set_tag(run_id, "attempts", int(old.get("attempts", "1")) + 1)
            if "error" in old:
                client.set_tag(run_id, "previous_error", old["error"])
            for key in ("error", "ended_by", "stopped_reason"):
                if key in old:
                    client.delete_tag(run_id, key)
            client.update_run(run_id, status="RUNNING")
        return cls(client, run_id)

    def log_epoch(self, metrics: dict) -> None:
        self.log_metrics(metrics, int(metrics.get(EPOCH, 0)))

    def log_metrics(self, metrics: dict, step: int) -> None:
        """The scalar metrics at `step`, in batches MLflow accepts."""
        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in scalar_metrics(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i: i + 500])

    def logged_epochs(self) -> set[int]:
        """The epochs this run has a record of (every epoch logs `epoch_seconds`)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, EPOCH_SECONDS)}

    def log_missing_epochs(self, history: list[dict]) -> list[int]:
        """Log the epochs of a checkpoint's history that MLflow lacks (a worker killed between
        its commit and its log); returns them."""
        logged = self.logged_epochs()
        missing = [m for m in history if EPOCH_SECONDS in m and m[EPOCH] not in logged]
        for metrics in missing:
            self.log_epoch(metrics)
        return [m[EPOCH] for m in missing]

    def is_running(self) -> bool:
        """Whether the run is still open (the driver ends it when Tune ends the trial)."""
        return self.client.get_run(self.run_id).info.status == "RUNNING"

    def tag(self, **tags) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_dict(self, data: dict, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            self.log_artifact(path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
