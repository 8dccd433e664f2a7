"""Promotion: the best finished trial of a study becomes a version of a registered model.

Format: a registered version's source is an MLflow Model logged from code (`diffcraft/serving.py`,
`mlflow.pyfunc`): `mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(...)` and
`mlflow models serve` do timbre transfer with it. Its artifact `checkpoint` is the diffcraft
checkpoint `best.pt` that promotion re-measured (plain tensors and the full run config, loaded
with `weights_only=True`); the diffcraft package travels with it as the model's code. Nothing is
pickled: MLflow's torch.export flavour needs a traceable forward pass, which the synthesiser's
fused kernels are not, and its pickle flavours execute code on load. The logged model belongs to
the study's experiment, with the trial's run as its source run.
"""
from __future__ import annotations

import math
import operator
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient

from diffcraft.errors import CheckpointError, ConfigError
from diffcraft.study.state import started_state
from diffcraft.study.tracking import metric_at, trial_runs
from diffcraft.study.schema import StudyConfig, StudyConfigError, best_of

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne}
CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$")
REPRODUCE_TOLERANCE = 1e-3  # relative difference allowed between the logged and re-measured metric
MODEL_FORMAT = "mlflow-pyfunc from code (diffcraft.serving; checkpoint artifact loaded weights_only)"


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


def check_metric_names(study: StudyConfig, names: list[tuple[str, str]]) -> None:
    """Each (option, metric) must name a metric the study's trials report (or it with 'val_'
    dropped); refused before anything is read, listing the ones they report."""
    reported = study.reported_metrics()
    for option, name in names:
        if name not in reported and f"val_{name}" not in reported:
            raise StudyConfigError(f"{option}: {name!r} is not a metric the trials of study {study.name!r} report; "
                                   f"they report: {', '.join(sorted(reported))}")


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
    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.train.checkpoint import model_from_checkpoint
    from diffcraft.train.data import make_loaders
    from diffcraft.train.evaluate import evaluate
    from diffcraft.train.loop import make_autocast
    from diffcraft.train.loss import validation_loss

    metric = metric or study.objective.metric
    mode = mode or study.objective.mode
    if mode not in ("min", "max"):
        raise ConfigError(f"--mode {mode!r} is not min or max")
    constraints = [parse_constraint(w) for w in where]
    check_metric_names(study, [("--metric", metric)] + [(f"--where {w!r}", c[0]) for w, c in zip(where, constraints)])
    state = started_state(study)
    client = MlflowClient(state["tracking_uri"])
    runs = trial_runs(client, state)
    if trial is not None:
        runs = [r for r in runs if trial in (r.data.tags.get("trial_id"), r.data.tags.get("trial_name"), r.info.run_id)]
        if not runs:
            raise StudyConfigError(f"--trial {trial!r}: no such trial in study {study.name!r}")
        if not promotable(runs[0]):
            raise StudyConfigError(f"trial {trial} is {runs[0].info.status}, not FINISHED: refusing to promote it")
    candidates, rejected = [], []
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
        (rejected if failed else candidates).append((value, key, run, failed))
    if not candidates:
        detail = "; ".join(f"{r.data.tags.get('trial_name')}: {', '.join(f)}" for _, _, r, f in rejected)
        raise StudyConfigError(f"study {study.name!r}: no finished trial with {metric}" +
                               (f" meets {list(where)} ({detail})" if where else ""))
    value, key, best, _ = best_of(candidates, key=lambda c: c[0], mode=mode)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = resolve_checkpoint(f"runs:/{best.info.run_id}/checkpoint", state["tracking_uri"], Path(tmp))
        model, cfg = model_from_checkpoint(checkpoint)
        import torch

        torch.manual_seed(cfg.train.seed)
        _, val_loader = make_loaders(cfg)
        remeasured = evaluate(model, val_loader, MultiScaleSpectralLoss(), torch.device("cpu"),
                              make_autocast(torch.device("cpu"), cfg.train.precision))
        remeasured["val_loss"] = validation_loss(remeasured, cfg)
        measured = remeasured.get(key)
        if measured is None or abs(measured - value) > REPRODUCE_TOLERANCE * max(1.0, abs(value)):
            raise CheckpointError(f"trial {best.data.tags.get('trial_name')}: its checkpoint gives {key}={measured} "
                                  f"on the validation clips, not the logged {value}: refusing to promote it")
        tags = {"study": study.name, "trial": best.data.tags.get("trial_name", ""),
                "trial_id": best.data.tags.get("trial_id", ""), "metric": key, "value": f"{value:.6g}",
                "config_hash": best.data.tags.get("config_hash", ""), "format": MODEL_FORMAT}
        logged = log_serving_model(client, best, checkpoint, tags)  # the very file just re-measured
    name = name or model_name(study)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, tags={"study": study.name},
                                       description=f"DiffCraft models promoted from study {study.name}")
    description = (f"Trial {tags['trial']} of study {study.name}: {key} = {value:.6g} ({mode}) at epoch "
                   f"{best.data.tags['best_epoch']}; reproduced {measured:.6g} on the validation clips. "
                   f"Constraints: {list(where) or 'none'}. Timbre transfer: mlflow.pyfunc.load_model(...).predict("
                   f"DataFrame with an `audio` or `path` column), `mlflow models serve`, or `diffcraft transfer "
                   f"--model`.")
    version = client.create_model_version(name, source=logged.model_uri, run_id=best.info.run_id, tags=tags,
                                          description=description, model_id=logged.model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return Promotion(name, str(version.version), alias, best.info.run_id, tags["trial"], key, value, measured)


def promotable(run) -> bool:
    """Finished trials, and trials a scheduler stopped early (they logged their best checkpoint)."""
    return run.info.status == "FINISHED" or (run.info.status == "KILLED"
                                             and run.data.tags.get("ended_by") == "scheduler")


def log_serving_model(client: MlflowClient, run, checkpoint: Path, tags: dict):
    """Log `checkpoint` as an MLflow Model from code (diffcraft/serving.py) in the experiment of
    `run`, the trial's run, which becomes its source run: returns the ModelInfo."""
    import diffcraft
    from diffcraft import serving
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    mlflow.set_tracking_uri(client.tracking_uri)  # log_model, and the registry's look-up of models:/m-..., use it
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run.info.run_id,
                                       tags=tags, params=run.data.params)
    try:
        info = mlflow.pyfunc.log_model(
            name="model", model_id=model.model_id,
            python_model=serving.__file__,  # MLflow keeps the file's source and runs it on load
            artifacts={serving.CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(Path(diffcraft.__file__).parent)],
            pip_requirements=serving.pip_requirements(), signature=serving.signature(),
            input_example=(serving.input_example(), serving.EXAMPLE_PARAMS))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, int(float(run.data.tags["best_epoch"])))])
    return info


def resolve_checkpoint(uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """A local best.pt for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `models:/MODEL_ID`,
    `runs:/ID/checkpoint`, an MLflow Model folder, or a checkpoint file or folder: the one place
    where model URIs become files. In an MLflow Model (what `promote` registers) the checkpoint is
    its artifact `checkpoint`; versions registered before that are the checkpoint folder itself."""
    if uri.startswith(("models:/", "runs:/")):
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
        except Exception as err:  # noqa: BLE001 - any store error means there is nothing to load
            raise CheckpointError(f"{uri}: cannot be resolved at MLflow {mlflow.get_tracking_uri()} "
                                  f"({str(err).splitlines()[0]})") from None
    else:
        path = Path(uri)
    if (path / MLMODEL_FILE_NAME).is_file():
        from diffcraft.serving import CHECKPOINT_ARTIFACT

        artifacts = Model.load(str(path / MLMODEL_FILE_NAME)).flavors.get("python_function", {}).get("artifacts") or {}
        if CHECKPOINT_ARTIFACT not in artifacts:
            raise CheckpointError(f"{uri}: an MLflow Model without a {CHECKPOINT_ARTIFACT!r} artifact, "
                                  f"not a promoted diffcraft model")
        path = path / artifacts[CHECKPOINT_ARTIFACT]["path"]
    elif path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{uri}: no such checkpoint")
    return path
