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
