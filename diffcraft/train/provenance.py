"""What a run needs to be reproduced, recorded on the run itself (`Session.record`): the code (git
commit and dirty flag of the diffcraft that trains, or its version when installed from a wheel),
the versions of the libraries that shape the numbers, CUDA and the GPU, the hash of the feature
cache's manifest and the exact command. Every key starts with RECORD, so a report finds them.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RECORD = "repro."  # the prefix of every key (MLflow tags of a trial run)
COMMAND_ENV = "DIFFCRAFT_COMMAND"  # the command that started it all, set by the CLI and passed to Ray's workers
PACKAGES = ("torch", "ray", "mlflow", "optuna", "numpy")


def code_state(package_dir: Path | None = None) -> dict[str, str]:
    """{commit, dirty} of the git checkout diffcraft is imported from, or {version} when it is
    not a checkout (a wheel). Dirty: tracked files differ from the commit."""
    import diffcraft

    package_dir = Path(package_dir or Path(diffcraft.__file__).parent).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=package_dir, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or not (Path(top) / package_dir.name).resolve() == package_dir:
        return {"version": _version("diffcraft") or diffcraft.__version__}
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": dirty}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def manifest_hash(cache: str) -> str:
    """SHA-256 of the feature cache's manifest (it holds every array's hash: one value names the data)."""
    from diffcraft.data.cache import MANIFEST
    from diffcraft.storage import Location

    text = (Location.of(cache) / MANIFEST).read_text()
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else "none"


RAY_WORKER = "default_worker.py"  # the script of a Ray worker process: its own command says nothing


def command() -> str:
    """The command that started the run: the driver's (COMMAND_ENV, which the CLI and a study's
    driver set and Ray's workers inherit or are passed), else this process's own."""
    given = os.environ.get(COMMAND_ENV)
    if not given and sys.argv and Path(sys.argv[0]).name == RAY_WORKER:
        return "unknown: a Ray worker whose driver did not pass its command (a Ray started before the driver)"
    return (given or shlex.join(sys.argv))[:5000]  # MLflow's longest tag


def reproducibility(cache: str, device) -> dict[str, str]:
    """The record (see the module docstring) of a run on `device` (a torch.device) training on `cache`."""
    import torch

    out = {f"diffcraft.{k}": v for k, v in code_state().items()}
    out.update({name: _version(name) or "absent" for name in PACKAGES})
    out["python"] = sys.version.split()[0]
    out["cuda"] = torch.version.cuda or "none"
    out["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    out["cache_manifest"] = manifest_hash(cache)
    out["command"] = command()
    return {RECORD + k: v for k, v in out.items()}
