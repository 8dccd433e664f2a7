"""The promoted model as an MLflow Model: timbre transfer behind `mlflow.pyfunc`, run by the
installed diffcraft.

`diffcraft promote` logs a model whose loader is this module (`loader_module="diffcraft.serving"`)
and whose data is the diffcraft checkpoint `best.pt`: no code is stored with the model, so loading
it runs the diffcraft installed where it loads, never code from the tracking server. The model's
metadata keeps the hash of the diffcraft package that promoted it (`CODE_HASH`): `_load_pyfunc`
refuses a model that carries code, or that was promoted by other diffcraft code than the installed
one, saying which. The network is rebuilt with `model_from_checkpoint` (`weights_only=True`): a
checkpoint that would execute code is refused.

predict(model_input, params) -> DataFrame
  model_input  a DataFrame, one row per clip, with an `audio` column (mono float samples at 16 kHz,
               any length) or a `path` column (an audio file on the machine that runs the model,
               read as `diffcraft transfer` reads it: any rate, channels averaged); each row gives
               exactly one of the two
  params       pitch_shift (semitones, 0.0), loudness_offset (dB, 0.0), f0 ("auto": the model's
               encoder when it has one, else CREPE; "encoder"; "crepe"), crepe_model ("full" or
               "tiny"), seed (of the noise generator, 0: the same request gives the same audio)
  returns      a DataFrame with an `audio` column: each clip transferred, float32 samples at
               16 kHz, as many as its input

`signature`, `input_example` and `pip_requirements` describe the model to `log_model`.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.audio.crepe import CREPE_MODELS, crepe_pitch
from diffcraft.audio.io import load_audio, validate_audio
from diffcraft.errors import CheckpointError, DiffcraftError
from diffcraft.train.checkpoint import model_from_checkpoint
from diffcraft.transfer import F0_SOURCES, resolve_f0_source, timbre_transfer

PARAMS = {"pitch_shift": 0.0, "loudness_offset": 0.0, "f0": "auto", "crepe_model": "full", "seed": 0}
PARAM_TYPES = {float: "double", str: "string", int: "long"}
EXAMPLE_SECONDS = 0.5  # length of the logged input example (a 440 Hz tone)
EXAMPLE_PARAMS = {"pitch_shift": -12.0, "crepe_model": "tiny"}  # logged with it; MLflow runs it once at logging
# Distributions the code behind predict imports (besides diffcraft itself, installed where the model loads).
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "torchcrepe", "numpy", "pandas", "scipy", "numba", "soundfile", "soxr",
                         "pyyaml", "tqdm")
TORCH_INDEX = "https://download.pytorch.org/whl/{label}"  # PyTorch's index of the builds labelled +cpu, +cu124, ...


def signature() -> ModelSignature:
    """Input: optional `audio` (float array) and `path` (string) columns; output: `audio`; params
    with their defaults."""
    inputs = Schema([ColSpec(Array("double"), "audio", required=False), ColSpec("string", "path", required=False)])
    params = ParamSchema([ParamSpec(name, PARAM_TYPES[type(default)], default) for name, default in PARAMS.items()])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(Array("float"), "audio")]), params=params)


def input_example() -> pd.DataFrame:
    """One clip: EXAMPLE_SECONDS of a 440 Hz tone at 16 kHz."""
    t = np.arange(int(EXAMPLE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    return pd.DataFrame({"audio": [(0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)]})


def pip_requirements() -> list[str]:
    """SERVING_DISTRIBUTIONS pinned to the installed versions. A torch build with a local label
    (`2.13.0+cpu`) keeps it, with PyTorch's index for that label: PyPI does not have it."""
    pinned = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            installed = version(name)
        except PackageNotFoundError:
            pinned.append(name)
            continue
        if name == "torch" and "+" in installed:
            pinned.append(f"--extra-index-url {TORCH_INDEX.format(label=installed.split('+', 1)[1])}")
        pinned.append(f"{name}=={installed}")
    return pinned


def _invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and the message."""
    return MlflowException.invalid_parameter_value(message)


def read_clips(model_input) -> list[np.ndarray]:
    """The 16 kHz mono clips [n_samples] of each row of `model_input` (`audio` or `path`)."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if not {"audio", "path"} & set(frame.columns):
        raise _invalid(f"input has columns {list(frame.columns)}: expected `audio` (float samples at "
                       f"{SAMPLE_RATE} Hz) or `path` (an audio file)")
    clips = []
    for i, row in enumerate(frame.to_dict("records")):
        audio, path = row.get("audio"), row.get("path")
        has_audio = audio is not None and not (np.isscalar(audio) and pd.isna(audio))
        has_path = isinstance(path, str) and path != ""
        if has_audio == has_path:
            raise _invalid(f"row {i}: give exactly one of `audio` and `path`")
        try:
            clips.append(load_audio(path) if has_path else
                         validate_audio(np.asarray(audio, dtype=np.float32).reshape(-1), f"row {i} audio"))
        except DiffcraftError as err:
            raise _invalid(str(err)) from None
    return clips


CODE_HASH = "diffcraft_code_hash"  # model metadata: the hash of the diffcraft package that promoted it


def code_hash() -> str:
    """sha256 over the installed diffcraft package's Python files (path and content, in order):
    what a promoted model runs when it loads."""
    import diffcraft

    root, digest = Path(diffcraft.__file__).parent, hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def check_model_code(model_dir: Path) -> None:
    """Refuse a model folder that carries code, or whose promoting diffcraft differs from the installed one."""
    from mlflow.models import Model

    meta = Model.load(str(model_dir / "MLmodel"))
    flavor = meta.flavors.get("python_function", {})
    if flavor.get("code") or flavor.get("loader_module") != __name__:
        raise CheckpointError(f"{model_dir}: this model carries its own code ({flavor.get('code') or flavor.get('loader_module')}); "
                              "a diffcraft model runs only the installed diffcraft, so it is refused")
    logged, installed = (meta.metadata or {}).get(CODE_HASH), code_hash()
    if str(logged) != installed:
        import diffcraft

        raise CheckpointError(f"{model_dir}: promoted by diffcraft code {logged}, but the installed diffcraft "
                              f"{diffcraft.__version__} ({Path(diffcraft.__file__).parent}) is {installed}: load it "
                              "with the diffcraft that promoted it, or promote it again with this one")


def _load_pyfunc(data_path: str) -> "TimbreTransfer":
    """MLflow's entry point for `loader_module`: `data_path` is the model's checkpoint."""
    check_model_code(Path(data_path).parent.parent if Path(data_path).parent.name == "data" else Path(data_path).parent)
    return TimbreTransfer(data_path)


class TimbreTransfer:
    """`diffcraft.transfer.timbre_transfer` of each input row with the checkpoint's instrument."""

    def __init__(self, checkpoint: str):
        self.model, _ = model_from_checkpoint(checkpoint)
        self.lock = threading.Lock()  # the noise seed is the process's torch generator: one request at a time

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = {**PARAMS, **(params or {})}
        f0 = resolve_f0_source(self.model, params["f0"])
        if f0 not in F0_SOURCES:
            raise _invalid(f"f0: {params['f0']!r} is not one of {['auto', *F0_SOURCES]}")
        if params["crepe_model"] not in CREPE_MODELS:
            raise _invalid(f"crepe_model: {params['crepe_model']!r} is not one of {list(CREPE_MODELS)}")
        out = []
        for clip in read_clips(model_input):
            with self.lock, torch.random.fork_rng(devices=[]):
                if f0 == "crepe":  # load CREPE before seeding: building its network draws from the generator
                    crepe_pitch(np.zeros(HOP_LENGTH, np.float32), params["crepe_model"], progress=False)
                torch.manual_seed(int(params["seed"]))
                try:
                    out.append(timbre_transfer(self.model, clip, f0, float(params["pitch_shift"]),
                                               float(params["loudness_offset"]), params["crepe_model"]).audio)
                except DiffcraftError as err:
                    raise _invalid(str(err)) from None
        return pd.DataFrame({"audio": out})
