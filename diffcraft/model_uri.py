"""Where model URIs become files: the one place that turns `models:/NAME@ALIAS`,
`models:/NAME/VERSION`, `models:/MODEL_ID`, `runs:/ID/...`, a bare MLflow run id, an MLflow Model
folder or a checkpoint path into a local checkpoint file. Timbre transfer, serving, figures and
promotion use it; it needs MLflow only for a URI that lives there, and knows nothing of studies.
"""
from __future__ import annotations

import re
from pathlib import Path

from diffcraft.errors import CheckpointError

CHECKPOINT_ARTIFACT = "checkpoint"  # the MLflow Model artifact (of a promoted model) holding best.pt
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id, as told apart from a path or a model URI


def default_tracking_uri(uri: str = "") -> str:
    """The configured URI, or an absolute SQLite file `mlflow.db` in the working directory (an
    absolute URI, so every Ray worker writes to the same file whatever its working directory)."""
    return uri or f"sqlite:///{(Path.cwd() / 'mlflow.db').resolve()}"


def tracking_client(uri: str):
    """An MlflowClient for `uri`, its `${VAR}` references resolved here (the URI itself is kept
    and logged unresolved)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(usable_tracking_uri(uri))


def usable_tracking_uri(uri: str) -> str:
    """`uri` with its `${VAR}` references resolved from this process's environment."""
    from diffcraft.envref import resolve

    return resolve(uri, "mlflow.tracking_uri")


def _download(uri: str, tracking_uri: str | None, dst: Path | None) -> Path:
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(usable_tracking_uri(tracking_uri))
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
    except Exception as err:  # noqa: BLE001 - any store error means there is nothing to load
        raise CheckpointError(f"{uri}: cannot be resolved at MLflow {mlflow.get_tracking_uri()} "
                              f"({str(err).splitlines()[0]})") from None


def _model_checkpoint(uri: str, folder: Path) -> Path:
    """The checkpoint inside an MLflow Model folder: its data (what `diffcraft promote` logs), or
    its artifact `checkpoint` (models promoted by diffcraft before the loader module)."""
    from mlflow.models import Model

    flavor = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
    if flavor.get("data"):
        return folder / flavor["data"]
    artifacts = flavor.get("artifacts") or {}
    if CHECKPOINT_ARTIFACT not in artifacts:
        raise CheckpointError(f"{uri}: an MLflow Model without a checkpoint, not a promoted diffcraft model")
    return folder / artifacts[CHECKPOINT_ARTIFACT]["path"]


def resolve_checkpoint(uri: str, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """A local best.pt for `models:/...`, `runs:/ID/checkpoint`, an MLflow Model folder, or a
    checkpoint file or folder. In an MLflow Model (what `promote` registers) the checkpoint is its
    data; versions registered before that are the checkpoint folder itself."""
    path = _download(uri, tracking_uri, dst) if uri.startswith(("models:/", "runs:/")) else Path(uri)
    if (path / "MLmodel").is_file():
        path = _model_checkpoint(uri, path)
    elif path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise CheckpointError(f"{uri}: no such checkpoint")
    return path


def resolve_source(source: str, tracking_uri: str, dst: Path) -> tuple[Path, str | None]:
    """(local checkpoint, run id or None): `resolve_checkpoint`, where a bare MLflow run id (that
    is not also a file here) means that run's checkpoint/best.pt."""
    if not RUN_ID.fullmatch(source) or Path(source).exists():
        return resolve_checkpoint(source, tracking_uri, dst), None
    from mlflow.exceptions import MlflowException

    try:
        tracking_client(tracking_uri).get_run(source)
    except MlflowException:
        raise CheckpointError(f"{source}: no such run at MLflow {tracking_uri} (and no such file)") from None
    return resolve_checkpoint(f"runs:/{source}/checkpoint/best.pt", tracking_uri, dst), source
