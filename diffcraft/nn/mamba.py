"""Mamba (selective state space) block, parameter for parameter the layout of `mamba_ssm.Mamba`,
so state dicts move between the two. The scan runs on mamba_ssm's kernel on CUDA when available,
else on diffcraft's Triton kernel; on CPU the short convolution and the scan run on fused numba
kernels (`nn.conv`, `nn.scan`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffcraft.nn.conv import causal_conv_silu
from diffcraft.nn.scan import selective_scan


class Mamba(nn.Module):
    """[batch, L, d_model] -> [batch, L, d_model]. Defaults are mamba_ssm's. `impl` picks the scan
    (`nn.scan.SCANS`): auto (the process's choice, by device) | mamba_ssm | triton | fused (numba,
    CPU) | reference (plain PyTorch)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 impl: str = "auto"):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.impl = impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # two products instead of one and a chunk: x and z come out contiguous for the kernels
        biases = self.in_proj.bias.chunk(2) if self.in_proj.bias is not None else (None, None)
        x, z = (F.linear(hidden, w, b) for w, b in zip(self.in_proj.weight.chunk(2), biases))
        bias = self.conv1d.bias if self.conv1d.bias is not None else x.new_zeros(self.d_inner)
        conv_impl = "reference" if self.impl == "reference" else "auto"
        x = causal_conv_silu(x, self.conv1d.weight, bias, conv_impl)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = dt @ self.dt_proj.weight.T
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, delta, A, Bm, Cm, self.D, z, self.dt_proj.bias, self.impl)
        return self.out_proj(y)
