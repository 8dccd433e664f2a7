"""Promotion: the best finished trial of a study becomes a version of a registered model.

Format: a registered model version's source is the trial run's `checkpoint/` artifact folder (the
diffcraft checkpoint `best.pt`: plain tensors and its full run config, loaded with
`weights_only=True`). MLflow's default torch.export flavour needs a traceable forward pass and
MLflow's pickle flavour unpickles code on load; this format does neither, and
`models:/NAME@ALIAS` resolves to the folder through the registry as usual.
"""
from __future__ import annotations

import math
import operator
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from diffcraft.errors import CheckpointError, ConfigError
from diffcraft.study.runner import started_state
from diffcraft.study.tracking import metric_at, trial_runs
from diffcraft.study.schema import StudyConfig, StudyConfigError

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


def parse_constraint(text: str) -> tuple[str, str, float]:
    """'active_units >= 4' -> ('val_active_units', '>=', 4.0); metric names may drop 'val_'."""
    match = CONSTRAINT.match(text)
    if not match:
        raise ConfigError(f"--where {text!r}: expected METRIC OP NUMBER with OP one of {', '.join(OPS)}")
    metric, op, value = match.groups()
    return metric, op, float(value)


def _resolve(client, run_id: str, metric: str, step: int) -> tuple[str, float | None]:
    for name in (metric, f"val_{metric}"):
        value = metric_at(client, run_id, name, step)
        if value is not None:
            return name, value
    return metric, None


def model_name(study: StudyConfig) -> str:
    return f"diffcraft-{study.name}"


def promote(study: StudyConfig, metric: str | None = None, mode: str | None = None,
            alias: str = "champion", where: list[str] = (), name: str | None = None,
            trial: str | None = None) -> Promotion:
    """Pick, verify and register the best finished trial (or the named `trial`)."""
    from diffcraft.transfer import model_from_checkpoint
    from diffcraft.train.evaluate import evaluate
    from diffcraft.train.loop import make_autocast, make_loaders, validation_loss
    from diffcraft.losses import MultiScaleSpectralLoss

    state = started_state(study)
    metric = metric or study.objective.metric
    mode = mode or study.objective.mode
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode {mode!r} is not min or max")
    constraints = [parse_constraint(w) for w in where]
    client = MlflowClient(state["tracking_uri"])
    runs = trial_runs(client, state)
    if trial is not None:
        runs = [r for r in runs if trial in (r.data.tags.get("trial_id"), r.data.tags.get("trial_name"), r.info.run_id)]
        if not runs:
            raise StudyConfigError(f"--trial {trial!r}: no such trial in study {study.name!r}")
        if runs[0].info.status != "FINISHED":
            raise StudyConfigError(f"trial {trial} is {runs[0].info.status}, not FINISHED: refusing to promote it")
    candidates, rejected = [], []
    for run in runs:
        if run.info.status != "FINISHED" or "best_epoch" not in run.data.tags:
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
        (rejected if failed else candidates).append((value, key, run, failed))
    if not candidates:
        detail = "; ".join(f"{r.data.tags.get('trial_name')}: {', '.join(f)}" for _, _, r, f in rejected)
        raise StudyConfigError(f"study {study.name!r}: no finished trial with {metric}" +
                               (f" meets {list(where)} ({detail})" if where else ""))
    value, key, best, _ = (min if mode == "min" else max)(candidates, key=lambda c: c[0])

    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=best.info.run_id, artifact_path="checkpoint",
                                                              dst_path=tmp, tracking_uri=state["tracking_uri"]))
        except Exception as err:  # noqa: BLE001 - any store error means there is nothing to promote
            raise CheckpointError(f"trial {best.data.tags.get('trial_name')}: its checkpoint artifact "
                                  f"cannot be downloaded ({err})") from None
        model, cfg = model_from_checkpoint(folder / "best.pt")
        import torch

        torch.manual_seed(cfg.train.seed)
        _, val_loader = make_loaders(cfg, torch.Generator().manual_seed(cfg.train.seed))
        remeasured = evaluate(model, val_loader, MultiScaleSpectralLoss(), torch.device("cpu"),
                              make_autocast(torch.device("cpu"), cfg.train.precision))
        remeasured["val_loss"] = validation_loss(remeasured, cfg)
        measured = remeasured.get(key)
    if measured is None or abs(measured - value) > REPRODUCE_TOLERANCE * max(1.0, abs(value)):
        raise CheckpointError(f"trial {best.data.tags.get('trial_name')}: its checkpoint gives {key}={measured} "
                              f"on the validation clips, not the logged {value}: refusing to promote it")
    name = name or model_name(study)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={"study": study.name},
                                       description=f"DiffCraft models promoted from study {study.name}")
    tags = {"study": study.name, "trial": best.data.tags.get("trial_name", ""), "trial_id": best.data.tags.get("trial_id", ""),
            "metric": key, "value": f"{value:.6g}", "config_hash": best.data.tags.get("config_hash", ""),
            "format": "diffcraft-checkpoint (weights_only)"}
    description = (f"Trial {tags['trial']} of study {study.name}: {key} = {value:.6g} ({mode}) at epoch "
                   f"{best.data.tags['best_epoch']}; reproduced {measured:.6g} on the validation clips. "
                   f"Constraints: {list(where) or 'none'}. Load with diffcraft.transfer.model_from_checkpoint.")
    version = client.create_model_version(name, source=f"runs:/{best.info.run_id}/checkpoint",
                                          run_id=best.info.run_id, tags=tags, description=description)
    client.set_registered_model_alias(name, alias, version.version)
    return Promotion(name, str(version.version), alias, best.info.run_id, tags["trial"], key, value, measured)


def checkpoint_for(model_uri: str, tracking_uri: str | None = None) -> Path:
    """A local best.pt for `models:/NAME@ALIAS` (or `models:/NAME/VERSION`), or a checkpoint path."""
    if not model_uri.startswith("models:/"):
        path = Path(model_uri)
        if path.is_dir():
            path = path / "best.pt"
        if not path.is_file():
            raise CheckpointError(f"{model_uri}: no such checkpoint")
        return path
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{model_uri}: cannot be resolved in the MLflow registry at "
                              f"{mlflow.get_tracking_uri()} ({str(err).splitlines()[0]})") from None
    return folder / "best.pt"
