"""Sequence cores by name: `make_core("bimamba", input_size, width)`.

Every core maps [batch, frames, input_size] -> [batch, frames, width]. The bidirectional variants
run a second core of the same kind on the time-reversed sequence, flip its output back, and merge
the two directions by concatenation and a linear projection to `width`: the same merge for GRU and
Mamba, so the comparison isolates the recurrence itself.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from diffcraft.nn.mamba import Mamba

CoreName = Literal["gru", "mamba", "bigru", "bimamba"]  # the names study files use
CORES = get_args(CoreName)


class GRUCore(nn.Module):
    def __init__(self, input_size: int, width: int, n_layers: int = 1):
        super().__init__()
        self.gru = nn.GRU(input_size, width, num_layers=n_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(x)[0]


class MambaCore(nn.Module):
    """Projection to `width` (none when the input already has it), then pre-norm residual Mamba
    blocks, then a final LayerNorm."""

    def __init__(self, input_size: int, width: int, n_layers: int = 1, d_state: int = 16,
                 expand: int = 2):
        super().__init__()
        self.proj = nn.Linear(input_size, width) if input_size != width else nn.Identity()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(n_layers))
        self.blocks = nn.ModuleList(Mamba(width, d_state=d_state, expand=expand) for _ in range(n_layers))
        self.norm_out = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x))
        return self.norm_out(x)


class Bidirectional(nn.Module):
    """Forward core + backward core on the reversed sequence; concat, then Linear(2w -> w)."""

    def __init__(self, forward_core: nn.Module, backward_core: nn.Module, width: int):
        super().__init__()
        self.forward_core, self.backward_core = forward_core, backward_core
        self.merge = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ahead = self.forward_core(x)
        behind = self.backward_core(x.flip(1)).flip(1)
        return self.merge(torch.cat([ahead, behind], dim=-1))


_UNIDIRECTIONAL = {"gru": GRUCore, "mamba": MambaCore}


def make_core(name: str, input_size: int, width: int, n_layers: int = 1) -> nn.Module:
    """The core called `name` (one of CORES)."""
    if name not in CORES:
        raise ValueError(f"core {name!r} is not one of {list(CORES)}")
    if name.startswith("bi"):
        kind = _UNIDIRECTIONAL[name[2:]]
        return Bidirectional(kind(input_size, width, n_layers), kind(input_size, width, n_layers), width)
    return _UNIDIRECTIONAL[name](input_size, width, n_layers)
