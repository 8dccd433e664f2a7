"""Promotion: the best finished trial of a study (by the objective, or `--metric`, at each trial's
best epoch, among those meeting the `--where` constraints) is re-measured from its checkpoint and,
when it reproduces its logged metric, registered (`study.registry`).
"""
from __future__ import annotations

import math
import operator
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffcraft.errors import CheckpointError, ConfigError, StudyConfigError
from diffcraft.model_uri import resolve_checkpoint
from diffcraft.study.config import StudyConfig
from diffcraft.study.record import StudyRecord
from diffcraft.study.registry import MODEL_FORMAT, Release, register
from diffcraft.study.tracking import metric_at, trial_runs
from diffcraft.train.names import VAL, VAL_LOSS
from diffcraft.train.selection import Objective

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne}
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$")
REPRODUCE_TOLERANCE = 1e-3  # relative difference allowed between the logged and re-measured metric


@dataclass
class Promotion:
    name: str
    version: str
    alias: str
    run_id: str
    trial: str
    metric: str
    value: float
    reproduced: float


@dataclass
class Candidate:
    """A trial that may be promoted, by its value at its best epoch."""
    run: object  # its MLflow run
    metric: str  # the metric as the trial logged it (with 'val_' where the option left it out)
    value: float
    failed: list[str]  # the constraints it does not meet


def parse_constraint(text: str) -> tuple[str, str, float]:
    """'active_units >= 4' -> ('active_units', '>=', 4.0); metric names may drop 'val_'."""
    match = CONSTRAINT.match(text)
    if not match:
        raise ConfigError(f"--where {text!r}: expected METRIC OP NUMBER with OP one of {', '.join(OPS)}")
    metric, op, value = match.groups()
    return metric, op, float(value)


def check_metric_names(study: StudyConfig, names: list[tuple[str, str]]) -> None:
    """Each (option, metric) must name a metric the study's trials report (or it with 'val_'
    dropped); refused before anything is read, listing the ones they report."""
    reported = study.reported_metrics()
    for option, name in names:
        if name not in reported and VAL + name not in reported:
            raise StudyConfigError(f"{option}: {name!r} is not a metric the trials of study {study.name!r} report; "
                                   f"they report: {', '.join(sorted(reported))}")


def model_name(study: StudyConfig) -> str:
    return f"diffcraft-{study.name}"


def promotable(run) -> bool:
    """Finished trials, and trials a scheduler stopped early (they logged their best checkpoint)."""
    return run.info.status == "FINISHED" or (run.info.status == "KILLED"
                                             and run.data.tags.get("ended_by") == "scheduler")


def _resolve(client, run_id: str, metric: str, step: int) -> tuple[str, float | None]:
    for name in (metric, VAL + metric):
        value = metric_at(client, run_id, name, step)
        if value is not None:
            return name, value
    return metric, None


def candidates(client, runs: list, metric: str, constraints: list[tuple[str, str, float]]) -> list[Candidate]:
    """The promotable runs with a finite `metric` at their best epoch, each with the constraints
    it fails there."""
    found = []
    for run in runs:
        if not promotable(run) or "best_epoch" not in run.data.tags:
            continue
        step = int(float(run.data.tags["best_epoch"]))
        key, value = _resolve(client, run.info.run_id, metric, step)
        if value is None or not math.isfinite(value):
            continue
        failed = []
        for c_metric, op, bound in constraints:
            c_key, c_value = _resolve(client, run.info.run_id, c_metric, step)
            if c_value is None or not OPS[op](c_value, bound):
                failed.append(f"{c_key}={c_value} fails {op} {bound:g}")
        found.append(Candidate(run, key, value, failed))
    return found


def _runs_to_consider(study: StudyConfig, client, record: StudyRecord, trial: str | None) -> list:
    """Every trial run, or the one named `trial` (id, name or run id), which must be promotable."""
    runs = trial_runs(client, record)
    if trial is None:
        return runs
    runs = [r for r in runs if trial in (r.data.tags.get("trial_id"), r.data.tags.get("trial_name"), r.info.run_id)]
    if not runs:
        raise StudyConfigError(f"--trial {trial!r}: no such trial in study {study.name!r}")
    if not promotable(runs[0]):
        raise StudyConfigError(f"trial {trial} is {runs[0].info.status}, not FINISHED: refusing to promote it")
    return runs


def remeasure(checkpoint: Path, best: Candidate) -> float:
    """The candidate's metric measured again from its checkpoint on the validation clips; a
    checkpoint that does not reproduce the logged value is refused."""
    import torch

    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.train.checkpoint import model_from_checkpoint
    from diffcraft.train.data import make_loaders
    from diffcraft.train.evaluate import evaluate
    from diffcraft.train.loop import make_autocast
    from diffcraft.train.loss import validation_loss

    model, cfg = model_from_checkpoint(checkpoint)
    torch.manual_seed(cfg.train.seed)
    _, val_loader = make_loaders(cfg)
    remeasured = evaluate(model, val_loader, MultiScaleSpectralLoss(), torch.device("cpu"),
                          make_autocast(torch.device("cpu"), cfg.train.precision))
    remeasured[VAL_LOSS] = validation_loss(remeasured, cfg)
    measured = remeasured.get(best.metric)
    if measured is None or abs(measured - best.value) > REPRODUCE_TOLERANCE * max(1.0, abs(best.value)):
        raise CheckpointError(f"trial {best.run.data.tags.get('trial_name')}: its checkpoint gives {best.metric}="
                              f"{measured} on the validation clips, not the logged {best.value}: refusing to promote it")
    return measured


def promote(study: StudyConfig, metric: str | None = None, mode: str | None = None,
            alias: str = "champion", where: list[str] = (), name: str | None = None,
            trial: str | None = None) -> Promotion:
    """Pick, verify and register the best finished trial (or the named `trial`)."""
    objective = Objective(metric or study.objective.metric, mode or study.objective.mode)
    if objective.mode not in ("min", "max"):
        raise ConfigError(f"--mode {objective.mode!r} is not min or max")
    constraints = [parse_constraint(w) for w in where]
    check_metric_names(study, [("--metric", objective.metric)] +
                       [(f"--where {w!r}", c[0]) for w, c in zip(where, constraints)])
    record = StudyRecord.started(study)
    client = record.client()
    found = candidates(client, _runs_to_consider(study, client, record, trial), objective.metric, constraints)
    meeting = [c for c in found if not c.failed]
    if not meeting:
        detail = "; ".join(f"{c.run.data.tags.get('trial_name')}: {', '.join(c.failed)}" for c in found)
        raise StudyConfigError(f"study {study.name!r}: no finished trial with {objective.metric}" +
                               (f" meets {list(where)} ({detail})" if where else ""))
    best = objective.best(meeting, key=lambda c: c.value)
    tags = {"study": study.name, "trial": best.run.data.tags.get("trial_name", ""),
            "trial_id": best.run.data.tags.get("trial_id", ""), "metric": best.metric, "value": f"{best.value:.6g}",
            "config_hash": best.run.data.tags.get("config_hash", ""), "format": MODEL_FORMAT}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = resolve_checkpoint(f"runs:/{best.run.info.run_id}/checkpoint", record.tracking_uri, Path(tmp))
        measured = remeasure(checkpoint, best)
        description = (
            f"Trial {tags['trial']} of study {study.name}: {best.metric} = {best.value:.6g} ({objective.mode}) at "
            f"epoch {best.run.data.tags['best_epoch']}; reproduced {measured:.6g} on the validation clips. "
            f"Constraints: {list(where) or 'none'}. Timbre transfer: mlflow.pyfunc.load_model(...).predict("
            f"DataFrame with an `audio` or `path` column), `mlflow models serve`, or `diffcraft transfer --model`.")
        release = Release(name or model_name(study), alias, study.name, tags, description)
        version = register(client, release, best.run, checkpoint)  # the very file just re-measured
    return Promotion(release.name, version, alias, best.run.info.run_id, tags["trial"], best.metric, best.value,
                     measured)
