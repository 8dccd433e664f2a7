"""Registration: a verified trial checkpoint becomes a version of a registered model.

Format: a registered version's source is an MLflow Model (`mlflow.pyfunc`) whose loader is the
installed `diffcraft.serving` and whose data is the diffcraft checkpoint `best.pt` that promotion
re-measured (plain tensors and the full run config, loaded with `weights_only=True`):
`mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(...)` and `mlflow models serve` do timbre
transfer with it wherever diffcraft is installed. No code is stored with the model (anyone who can
edit the experiment could change code stored there), and nothing is pickled: MLflow's torch.export
flavour needs a traceable forward pass, which the synthesiser's fused kernels are not, and its
pickle flavours execute code on load. The logged model belongs to the study's experiment, with the
trial's run as its source run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


MODEL_FORMAT = "mlflow-pyfunc, loader diffcraft.serving as installed (checkpoint data loaded weights_only)"


def log_serving_model(client: MlflowClient, run, checkpoint: Path, tags: dict):
    """Log `checkpoint` as an MLflow Model loaded by the installed diffcraft.serving, in the
    experiment of `run`, the trial's run, which becomes its source run: returns the ModelInfo."""
    from diffcraft import serving
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    mlflow.set_tracking_uri(client.tracking_uri)  # log_model, and the registry's look-up of models:/m-..., use it
    model = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run.info.run_id,
                                       tags=tags, params=run.data.params)
    try:
        info = mlflow.pyfunc.log_model(
            name="model", model_id=model.model_id,
            loader_module=serving.__name__, data_path=str(checkpoint),  # installed code, the checkpoint as data
            metadata={serving.CODE_HASH: serving.code_hash()},
            pip_requirements=serving.pip_requirements(), signature=serving.signature(),
            input_example=(serving.input_example(), serving.EXAMPLE_PARAMS))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, int(float(run.data.tags["best_epoch"])))])
    return info


@dataclass
class Release:
    """What a new version of a registered model says about itself."""
    name: str  # the registered model
    alias: str  # pointed at the new version (earlier versions stay)
    study: str  # the study it was promoted from
    tags: dict
    description: str


def register(client: MlflowClient, release: Release, run, checkpoint: Path) -> str:
    """Log `checkpoint` as a serving model of the trial's `run` and make it a new version of the
    registered model (created the first time), with the alias pointed at it; returns the version."""
    logged = log_serving_model(client, run, checkpoint, release.tags)
    try:
        client.get_registered_model(release.name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(release.name, tags={"study": release.study},
                                       description=f"DiffCraft models promoted from study {release.study}")
    version = client.create_model_version(release.name, source=logged.model_uri, run_id=run.info.run_id,
                                          tags=release.tags, description=release.description,
                                          model_id=logged.model_id)
    client.set_registered_model_alias(release.name, release.alias, version.version)
    return str(version.version)
