"""A study's trials as MLflow records them: each trial's values at its best epoch, and the
status lines `diffcraft study status` prints (a failed trial with its error and where the rest
of it is)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from diffcraft.study.config import StudyConfig
from diffcraft.study.record import StudyRecord
from diffcraft.study.tracking import metric_at, trial_runs
from diffcraft.train.names import N_PARAMETERS, SECONDS_PER_EPOCH, TEST, TRAIN, VAL
from diffcraft.train.provenance import RECORD

COST = (N_PARAMETERS, SECONDS_PER_EPOCH)  # what a configuration costs, logged once per trial


@dataclass
class TrialRecord:
    run_id: str
    trial: str  # Tune's trial name
    status: str
    params: dict
    group: str
    seed: str
    epochs: int
    best: dict  # metric -> value at the best epoch by the objective
    final: dict  # scored at the selected checkpoint: test_* metrics, n_parameters, seconds_per_epoch
    collapsed: bool
    name: str = ""  # the MLflow run's name: what varies (core=bimamba seed=1)
    error: str = ""  # a failed trial's error
    artifact_uri: str = ""
    record: dict = field(default_factory=dict)  # how to reproduce it (`train.provenance`, the RECORD tags)


def trial_records(study: StudyConfig) -> list[TrialRecord]:
    """Every trial's run with its values at its best epoch (by the study objective)."""
    record = StudyRecord.started(study)
    client = record.client()
    runs = trial_runs(client, record)
    objective = study.objective.metric
    searched = study.search.searched()
    records = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, objective)
        best_step = None
        if history:
            best_step = study.objective.best(history, key=lambda m: m.value).step
        best = {}
        if best_step is not None:
            for key in run.data.metrics:
                if key.startswith((VAL, TRAIN)):
                    value = metric_at(client, run.info.run_id, key, best_step)
                    if value is not None:
                        best[key] = value
        params = {k: v for k, v in run.data.params.items() if k.removeprefix("run.") in searched or k in searched}
        records.append(TrialRecord(run.info.run_id, run.data.tags.get("trial_name", run.info.run_name), run.info.status,
                                   params, run.data.tags.get("config_group", ""), run.data.tags.get("seed", ""),
                                   len(history), best, {k: v for k, v in run.data.metrics.items()
                                                        if k.startswith(TEST) or k.startswith(COST)},
                                   run.data.tags.get("collapsed") == "true", run.info.run_name,
                                   run.data.tags.get("error", ""), run.info.artifact_uri,
                                   {k: v for k, v in run.data.tags.items() if k.startswith(RECORD)}))
    return sorted(records, key=lambda r: r.trial)


def status_lines(study: StudyConfig) -> list[str]:
    """One line per trial (failed ones with the first line of their error and where the rest is)
    and the best so far."""
    records = trial_records(study)
    tracking_uri = StudyRecord.started(study).tracking_uri
    objective = study.objective.metric
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"study {study.name}: {len(records)} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))})"]
    width = max([len(r.name) for r in records] + [10])
    for r in records:
        value = r.best.get(objective, math.nan)
        flag = "  collapsed" if r.collapsed else ""
        lines.append(f"  {r.name:{width}s}  {r.status:9s} epochs {r.epochs:3d}  {objective} {value:.4f}  "
                     f"({r.trial}){flag}")
        if r.status == "FAILED":
            lines.append(f"      error: {error_headline(r.error)[:300]}")
            lines.append(f"      full error: {_full_error(r, study, tracking_uri)}")
    best = best_record(study, records)
    if best:
        lines.append(f"best so far: {best.name} ({best.trial}) {objective} {best.best[objective]:.4f}")
    return lines


def error_headline(text: str) -> str:
    """The line that says what went wrong: the innermost `SomeError: message` of a traceback (Ray
    wraps a worker's error in its own), else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\w*: ", line)]
    return (raised or lines or ["no error was recorded"])[-1 if raised else 0]


def best_record(study: StudyConfig, records: list[TrialRecord]) -> TrialRecord | None:
    """The trial with the best objective at its best epoch, if any has one."""
    done = [r for r in records if study.objective.metric in r.best]
    return study.objective.best(done, key=lambda r: r.best[study.objective.metric]) if done else None


def _full_error(record: TrialRecord, study: StudyConfig, tracking_uri: str) -> str:
    """Where a failed trial's traceback is: its run's error.txt (a path for a local artifact
    store, else the command that fetches it), or Tune's error file in the study's storage."""
    from urllib.parse import unquote, urlparse

    from diffcraft.model_uri import tracking_client

    client = tracking_client(tracking_uri)
    if any(a.path == "error.txt" for a in client.list_artifacts(record.run_id)):
        uri = f"{record.artifact_uri}/error.txt"
        if uri.startswith("file:"):
            return unquote(urlparse(uri).path)
        if uri.startswith("/"):
            return uri
        return (f"MLFLOW_TRACKING_URI={tracking_uri} mlflow artifacts download -r {record.run_id} -a error.txt "
                f"(run {record.name!r}, artifact error.txt)")
    tune = study.location / "tune"
    for rel in tune.list_info():
        if rel.startswith(record.trial) and rel.endswith("/error.txt"):
            return (tune / rel).uri
    return "no traceback was logged (the trial's process died); see the Ray logs of its node"
