"""Checkpoints written atomically and read without executing pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with torch.save
into a temporary file in the same folder, fsynced, then renamed over the target: a kill leaves
the previous checkpoint intact. Loading uses `weights_only=True`, which refuses any pickled
object that is not plain data, so a crafted file cannot run code.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from diffcraft.errors import CheckpointError

FORMAT = "diffcraft-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format": FORMAT, "version": VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict:
    """The checkpoint dict; CheckpointError names the file if it is missing, corrupt, not ours,
    or holds anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: refused, it holds more than plain data and loading it could "
                              f"execute code ({first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a diffcraft checkpoint")
    return state


def model_from_checkpoint(path: str | Path, device: str = "cpu"):
    """(model, RunConfig) rebuilt from the config stored in a checkpoint, weights loaded, in eval mode."""
    from diffcraft.typed_yaml import from_dict
    from diffcraft.errors import ConfigError
    from diffcraft.models.autoencoder import DiffCraft
    from diffcraft.train.config import RunConfig

    state = load_checkpoint(path, device)
    try:
        cfg = from_dict(RunConfig, state["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{path}: its stored config is not usable ({err})") from None
    model = DiffCraft(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), cfg


def init_weights(model: torch.nn.Module, path: str) -> int:
    """Copy the weights of checkpoint `path` whose names and shapes match (e.g. a pretrained
    encoder into a joint model); returns how many tensors were copied."""
    source = load_checkpoint(path)["model"]
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise CheckpointError(f"{path}: no weight in it matches this model")
    model.load_state_dict(matched, strict=False)
    return len(matched)


def rng_state() -> dict:
    """Every RNG stream a run draws from: torch's CPU generator and, on a GPU, CUDA's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if isinstance(state, torch.Tensor):  # checkpoints before the CUDA streams were kept
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
