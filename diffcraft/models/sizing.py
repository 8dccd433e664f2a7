"""Parameter counts, and the decoder width that matches a parameter budget: an ablation of cores
(GRU against BiGRU, Mamba against BiMamba) compares like with like only at equal size, since a
bidirectional core carries about 1.6x the parameters of its one-way twin at the same width."""
from __future__ import annotations

from dataclasses import replace

import torch


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_counted: dict[str, int] = {}  # repr(ModelConfig) -> parameters: a study asks about the same models often


def model_parameters(cfg) -> int:
    """Parameters of the model a ModelConfig builds (built on the meta device: no memory, fast)."""
    from diffcraft.models.autoencoder import DiffCraft

    key = repr(cfg)
    if key not in _counted:
        with torch.device("meta"):
            _counted[key] = count_parameters(DiffCraft(cfg))
    return _counted[key]


def matched_width(cfg, target: int) -> int:
    """The decoder width (model.decoder.width) whose model's parameter count is closest to
    `target`; counts grow with width, so a bisection finds it."""
    def size(width: int) -> int:
        return model_parameters(replace(cfg, decoder=replace(cfg.decoder, width=width)))

    low, high = 1, max(2, cfg.decoder.width)
    while size(high) < target:
        high *= 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if size(middle) < target else (low, middle)
    return min((low, high), key=lambda width: abs(size(width) - target))
