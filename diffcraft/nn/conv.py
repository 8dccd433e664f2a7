"""Mamba's short convolution with its activation: SiLU(depthwise causal conv1d(x)).

x: [batch, L, channels] (the layout the projections produce, no transposes); weight: the
`nn.Conv1d(groups=channels)` weight [channels, 1, taps]; output step t sees inputs t-taps+1..t.
On CPU a fused numba kernel (the taps, the bias and the SiLU in one pass, and one backward pass
that recomputes the pre-activation instead of storing it); on a GPU one depthwise `conv1d` (cuDNN:
two kernels where the sum of shifted products launches a dozen, and a GPU step is bound by the
host's launches); the same sum in plain PyTorch as the reference.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

from diffcraft.numba_support import (
    BLOCK,
    KERNEL_OPTS,
    as_numpy,
    fast_exp,
    use_torch_threads,
)


@numba.njit(fastmath=True, cache=True, inline="always")
def _preactivation(row, x, weight, bias_k, b, t, d0, w):  # pragma: no cover - compiled
    """row[:] = bias + the taps' weighted inputs x[b, t - taps + 1 .. t, d0: d0 + w] (those >= 0)."""
    taps = weight.shape[0]
    row[:] = bias_k
    for tap in range(max(0, taps - 1 - t), taps):
        xs = x[b, t - taps + 1 + tap, d0: d0 + w]
        wt = weight[tap, d0: d0 + w]
        for j in range(w):
            row[j] += wt[j] * xs[j]


@numba.njit(**KERNEL_OPTS)
def _conv_forward(x, weight, bias, block):  # pragma: no cover - compiled
    """x [batch, L, channels], weight [taps, channels], bias [channels] -> SiLU(conv(x))."""
    batch, length, channels = x.shape
    n_blocks = (channels + block - 1) // block
    out = np.empty((batch, length, channels), dtype=np.float32)
    for job in numba.prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        d0 = k * block
        w = min(block, channels - d0)
        bias_k = bias[d0: d0 + w]
        for t in range(length):
            o = out[b, t, d0: d0 + w]
            _preactivation(o, x, weight, bias_k, b, t, d0, w)
            for j in range(w):
                o[j] = o[j] / (np.float32(1.0) + fast_exp(-o[j]))
    return out


@numba.njit(**KERNEL_OPTS)
def _conv_backward(grad_out, x, weight, bias, block):  # pragma: no cover - compiled
    batch, length, channels = x.shape
    taps = weight.shape[0]
    n_blocks = (channels + block - 1) // block
    grad_x = np.empty((batch, length, channels), dtype=np.float32)
    grad_w = np.zeros((batch, taps, channels), dtype=np.float32)
    grad_b = np.zeros((batch, channels), dtype=np.float32)
    for job in numba.prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        d0 = k * block
        w = min(block, channels - d0)
        gs = np.empty((length, w), dtype=np.float32)  # gradient at the pre-activation
        gw = np.zeros((taps, w), dtype=np.float32)
        gb = grad_b[b, d0: d0 + w]
        bias_k = bias[d0: d0 + w]
        for t in range(length):
            g = gs[t]
            _preactivation(g, x, weight, bias_k, b, t, d0, w)
            go = grad_out[b, t, d0: d0 + w]
            for j in range(w):
                s = g[j]
                sig = np.float32(1.0) / (np.float32(1.0) + fast_exp(-s))
                g[j] = go[j] * sig * (np.float32(1.0) + s * (np.float32(1.0) - sig))
                gb[j] += g[j]
            for tap in range(max(0, taps - 1 - t), taps):
                xs = x[b, t - taps + 1 + tap, d0: d0 + w]
                gwt = gw[tap]
                for j in range(w):
                    gwt[j] += g[j] * xs[j]
        for t in range(length):
            gx = grad_x[b, t, d0: d0 + w]
            gx[:] = 0.0
            for tap in range(max(0, t + taps - length), taps):
                g = gs[t + taps - 1 - tap]
                wt = weight[tap, d0: d0 + w]
                for j in range(w):
                    gx[j] += wt[j] * g[j]
        for tap in range(taps):
            grad_w[b, tap, d0: d0 + w] = gw[tap]
    return grad_x, grad_w, grad_b


class _FusedCPUConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        use_torch_threads()
        arrays = [as_numpy(x), as_numpy(weight[:, 0].t()), as_numpy(bias)]
        ctx.arrays = arrays
        return torch.from_numpy(_conv_forward(*arrays, BLOCK))

    @staticmethod
    def backward(ctx, grad_out):
        use_torch_threads()
        grad_x, grad_w, grad_b = _conv_backward(as_numpy(grad_out), *ctx.arrays, BLOCK)
        del ctx.arrays
        grad_w = torch.from_numpy(grad_w).sum(0).t().unsqueeze(1)  # [channels, 1, taps]
        return torch.from_numpy(grad_x), grad_w, torch.from_numpy(grad_b).sum(0)


def causal_conv_silu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same function as a sum of shifted products in PyTorch, for tests and any device; in x's
    dtype (under autocast, the projection's bfloat16)."""
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    taps = weight.shape[-1]
    padded = F.pad(x, (0, 0, taps - 1, 0))
    length = x.shape[1]
    out = sum(padded[:, k: k + length] * weight[:, 0, k] for k in range(taps))
    return F.silu(out + bias)


def causal_conv_silu_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same function as one depthwise `conv1d` over [batch, channels, L] (padded on the left
    by its padding and the right end dropped), returned as a [batch, L, channels] view."""
    taps, length = weight.shape[-1], x.shape[1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=taps - 1, groups=x.shape[-1])[..., :length]
    return F.silu(out).transpose(1, 2)


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """SiLU(causal depthwise conv1d): x [batch, L, channels], weight [channels, 1, taps], bias
    [channels] -> [batch, L, channels]. impl: auto (fused on CPU, conv1d elsewhere) | fused |
    conv1d | reference."""
    if impl == "auto":
        impl = "fused" if x.device.type == "cpu" else "conv1d"
    if impl == "fused":
        return _FusedCPUConvSiLU.apply(x, weight, bias)
    if impl == "conv1d":
        return causal_conv_silu_conv1d(x, weight, bias)
    if impl != "reference":
        raise ValueError(f"convolution implementation {impl!r} is not auto, fused, conv1d or reference")
    return causal_conv_silu_reference(x, weight, bias)
