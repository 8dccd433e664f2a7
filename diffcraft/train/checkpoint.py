"""Checkpoints written atomically and read without executing pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with torch.save
into a temporary file in the same folder, fsynced, then renamed over the target
(`storage.write_atomically`): a kill leaves the previous checkpoint intact. Loading uses
`weights_only=True`, which refuses any pickled object that is not plain data, so a crafted file
cannot run code.

Checkpoints always load to the CPU, whatever device wrote them or will train on: the RNG states
must stay CPU byte tensors, and the model moves to its device before its optimizer's state is
loaded (`train.loop.start`), so nothing is mixed across devices after a resume.
"""
from __future__ import annotations

import pickle
import zipfile
from collections import Counter
from pathlib import Path

import torch

from diffcraft.errors import CheckpointError
from diffcraft.storage import write_atomically

FORMAT = "diffcraft-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> Path:
    saved = {"format": FORMAT, "version": VERSION, **state}
    return write_atomically(Path(path), lambda handle: torch.save(saved, handle))


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict, every tensor on the CPU; CheckpointError names the file if it is
    missing, corrupt, not ours, or holds anything but plain data."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
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

    saved = load_checkpoint(path)
    try:
        cfg = from_dict(RunConfig, saved["config"])
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{path}: its stored config is not usable ({err})") from None
    model = DiffCraft(cfg.model)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), cfg


def init_weights(model: torch.nn.Module, paths: str | Path | list) -> dict[str, dict]:
    """Start `model` from the weights of one checkpoint or several (e.g. a pretrained encoder and a
    pretrained decoder into a joint model), each top-level module from at most one of them.
    Returns {module: {'from': path or None, 'loaded': tensors copied, 'of': tensors it has}}.
    CheckpointError names the file when one matches nothing, holds a matching name with another
    shape, or provides a module another one already provided."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    own = model.state_dict()
    sizes = Counter(module_of(name) for name in own)
    report = {module: {"from": None, "loaded": 0, "of": n} for module, n in sizes.items()}
    chosen = {}
    for path in paths:
        matched = matching_weights(path, own)
        for module in sorted({module_of(name) for name in matched}):
            if report[module]["from"] is not None:
                raise CheckpointError(f"{path}: it holds {module} weights, which {report[module]['from']} already "
                                      f"provides; start each module from one checkpoint only")
            loaded = sum(module_of(name) == module for name in matched)
            report[module].update({"from": str(path), "loaded": loaded})
        chosen.update(matched)
    model.load_state_dict(chosen, strict=False)
    return report


def module_of(name: str) -> str:
    """The top-level module of a state-dict entry: 'encoder.heads.f0.proj.weight' -> 'encoder'."""
    return name.split(".", 1)[0]


def matching_weights(path: str | Path, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint `path` that `own` (a state dict) has by name; a name with another
    shape, or no name in common, raises CheckpointError naming the file."""
    source = load_checkpoint(path).get("model")
    if not isinstance(source, dict):
        raise CheckpointError(f"{path}: holds no model weights")
    matched = {name: value for name, value in source.items() if name in own}
    if not matched:
        raise CheckpointError(f"{path}: no weight in it matches this model (its modules: "
                              f"{', '.join(sorted({module_of(n) for n in source})) or 'none'})")
    wrong = [f"{name} is {list(value.shape)} there, {list(own[name].shape)} here"
             for name, value in matched.items() if value.shape != own[name].shape]
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"{path}: weights of another shape than this model's: {wrong[0]}{more}; "
                              f"was it trained with another model config?")
    return matched


def describe_init(report: dict[str, dict]) -> str:
    """What `init_weights` loaded, a line per module, for a person starting the run."""
    width = max(map(len, report), default=0)
    lines = [f"  {module:<{width}}  " + (f"{r['loaded']}/{r['of']} tensors from {r['from']}" if r["from"]
                                         else f"0/{r['of']} tensors, trained from scratch")
             for module, r in report.items()]
    return "\n".join(["initial weights:", *lines])


def rng_state(device: torch.device | None = None) -> dict:
    """Every RNG stream a run draws from: torch's CPU generator and, for a run on a GPU, that
    GPU's generator (CPU byte tensors both, as torch hands them out)."""
    streams = {"cpu": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        streams["cuda"] = torch.cuda.get_rng_state(device)
    return streams


def set_rng_state(streams: dict | torch.Tensor, device: torch.device | None = None) -> None:
    """Restore what `rng_state` saved: the CPU stream, and the GPU stream on `device` when the run
    trains on one (older checkpoints kept one state per visible GPU: the device's own is taken)."""
    if isinstance(streams, torch.Tensor):  # checkpoints before the CUDA streams were kept
        streams = {"cpu": streams}
    torch.set_rng_state(streams["cpu"].cpu())
    cuda = streams.get("cuda")
    if cuda is None or device is None or torch.device(device).type != "cuda":
        return
    device = torch.device(device)
    if isinstance(cuda, (list, tuple)):
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda.cpu(), device)
