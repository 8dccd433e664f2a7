"""The selective scan of Mamba: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <h_t, C_t>.

Four implementations of one function (`SCANS`), chosen by device unless named (`train.scan`):
- CUDA with mamba_ssm importable: its fused kernel (`selective_scan_fn`).
- CUDA without it: diffcraft's Triton kernels (`nn.scan_triton`), the same fusion as below; Triton
  comes with torch's CUDA builds, so a GPU user compiles nothing.
- CPU: fused numba kernels (the Δ bias and softplus, the scan, the D skip and the SiLU gate in
  one pass; exp and softplus by vectorised polynomials), one job per (batch item, block of 128 channels), vectorised over the
  channels of the block, in the [batch, L, channels] layout the projections produce (no
  transposes). The forward keeps the state only every 16 steps; the backward recomputes each
  chunk's states and runs the adjoint recurrence backwards, so no [batch, L, channels, state]
  tensor is ever built.
- `selective_scan_reference`: the plain step-by-step recurrence in PyTorch (the mamba_ssm
  `selective_scan_ref` math), for tests and any other device; about 20x slower than a kernel on a
  GPU. It unbinds the sequence instead of indexing one step at a time, which made backward about
  400x slower.

The scan in use is said once per process (stderr) and recorded on every run. The mamba_ssm and
Triton kernels receive one dtype for u, Δ, z, B and C (`kernel_dtype`), whatever autocast produced.
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from typing import Literal

import numba
import numpy as np
import torch
import torch.nn.functional as F

from diffcraft.numba_support import (
    BLOCK,
    KERNEL_OPTS,
    as_numpy,
    fast_exp,
    fast_softplus,
    use_torch_threads,
)
from diffcraft.errors import ConfigError

CHUNK = 16  # time steps between stored states


@numba.njit(fastmath=True, cache=True, inline="always")
def _step_delta(dt, dtu, raw, bias_k, ut):  # pragma: no cover - compiled
    """One time step's rows: dt = softplus(raw + bias), dtu = dt * u."""
    for j in range(dt.shape[0]):
        dt[j] = fast_softplus(raw[j] + bias_k[j])
        dtu[j] = dt[j] * ut[j]


@numba.njit(**KERNEL_OPTS)
def _scan_forward(u, delta, delta_bias, A_t, Bm, Cm, D, z, block, chunk):  # pragma: no cover - compiled
    """out = SiLU(z) * (scan(u, softplus(delta + delta_bias)) + D u), all [batch, L, d_inner];
    A_t is A transposed [N, d_inner]. One job per (batch, block of channels); vectors run over
    the channels."""
    batch, length, d_inner = u.shape
    n_state = A_t.shape[0]
    n_blocks = (d_inner + block - 1) // block
    n_chunks = (length + chunk - 1) // chunk
    out = np.empty((batch, length, d_inner), dtype=np.float32)
    checkpoints = np.empty((batch, n_chunks, n_state, d_inner), dtype=np.float32)
    for job in numba.prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        d0 = k * block
        w = min(block, d_inner - d0)
        h = np.zeros((n_state, w), dtype=np.float32)
        dt = np.empty(w, dtype=np.float32)
        dtu = np.empty(w, dtype=np.float32)
        d_blk = D[d0: d0 + w]
        bias_k = delta_bias[d0: d0 + w]
        for t in range(length):
            if t % chunk == 0:
                checkpoints[b, t // chunk, :, d0: d0 + w] = h
            raw = delta[b, t, d0: d0 + w]
            ut = u[b, t, d0: d0 + w]
            acc = out[b, t, d0: d0 + w]
            _step_delta(dt, dtu, raw, bias_k, ut)
            for j in range(w):
                acc[j] = d_blk[j] * ut[j]
            for n in range(n_state):
                bn = Bm[b, t, n]
                cn = Cm[b, t, n]
                a_n = A_t[n, d0: d0 + w]
                h_n = h[n]
                for j in range(w):
                    hj = fast_exp(dt[j] * a_n[j]) * h_n[j] + dtu[j] * bn
                    h_n[j] = hj
                    acc[j] += hj * cn
            zt = z[b, t, d0: d0 + w]
            for j in range(w):
                acc[j] = acc[j] * zt[j] / (np.float32(1.0) + fast_exp(-zt[j]))
    return out, checkpoints


@numba.njit(**KERNEL_OPTS)
def _scan_backward(grad_out, u, delta, delta_bias, A_t, Bm, Cm, D, z, checkpoints, block,
                   chunk):  # pragma: no cover - compiled
    batch, length, d_inner = u.shape
    n_state = A_t.shape[0]
    n_blocks = (d_inner + block - 1) // block
    n_chunks = checkpoints.shape[1]
    grad_u = np.empty_like(u)
    grad_delta = np.empty_like(delta)
    grad_z = np.empty_like(z)
    grad_A = np.zeros((batch, n_state, d_inner), dtype=np.float32)
    grad_D = np.zeros((batch, d_inner), dtype=np.float32)
    grad_B = np.zeros((batch, n_blocks, length, n_state), dtype=np.float32)
    grad_C = np.zeros((batch, n_blocks, length, n_state), dtype=np.float32)
    for job in numba.prange(batch * n_blocks):
        b, k = job // n_blocks, job % n_blocks
        d0 = k * block
        w = min(block, d_inner - d0)
        states = np.empty((chunk + 1, n_state, w), dtype=np.float32)
        decay = np.empty((chunk, n_state, w), dtype=np.float32)
        grad_h = np.zeros((n_state, w), dtype=np.float32)
        dts = np.empty((chunk, w), dtype=np.float32)  # the chunk's dt and dt * u, kept for the adjoint
        dtus = np.empty((chunk, w), dtype=np.float32)
        g = np.empty(w, dtype=np.float32)
        y0 = np.empty(w, dtype=np.float32)
        bias_k = delta_bias[d0: d0 + w]
        d_blk = D[d0: d0 + w]
        gD = grad_D[b, d0: d0 + w]
        gB = grad_B[b, k]
        gC = grad_C[b, k]
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(length, t0 + chunk)
            states[0] = checkpoints[b, c, :, d0: d0 + w]
            for t in range(t0, t1):  # recompute the chunk's states
                i = t - t0
                dt, dtu = dts[i], dtus[i]
                _step_delta(dt, dtu, delta[b, t, d0: d0 + w], bias_k, u[b, t, d0: d0 + w])
                for n in range(n_state):
                    bn = Bm[b, t, n]
                    a_n = A_t[n, d0: d0 + w]
                    dec = decay[i, n]
                    prev = states[i, n]
                    nxt = states[i + 1, n]
                    for j in range(w):
                        a = fast_exp(dt[j] * a_n[j])
                        dec[j] = a
                        nxt[j] = a * prev[j] + dtu[j] * bn
            for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, backwards in time
                i = t - t0
                raw = delta[b, t, d0: d0 + w]
                ut = u[b, t, d0: d0 + w]
                zt = z[b, t, d0: d0 + w]
                go = grad_out[b, t, d0: d0 + w]
                gz = grad_z[b, t, d0: d0 + w]
                g_dt = grad_delta[b, t, d0: d0 + w]
                g_u = grad_u[b, t, d0: d0 + w]
                dt, dtu = dts[i], dtus[i]
                for j in range(w):
                    y0[j] = d_blk[j] * ut[j]
                for n in range(n_state):
                    cn = Cm[b, t, n]
                    cur = states[i + 1, n]
                    for j in range(w):
                        y0[j] += cur[j] * cn
                for j in range(w):
                    s = np.float32(1.0) / (np.float32(1.0) + fast_exp(-zt[j]))
                    gz[j] = go[j] * y0[j] * s * (np.float32(1.0) + zt[j] * (np.float32(1.0) - s))
                    g[j] = go[j] * zt[j] * s  # gradient reaching the scan output
                    gD[j] += g[j] * ut[j]
                    g_u[j] = g[j] * d_blk[j]
                    g_dt[j] = 0.0
                for n in range(n_state):
                    bn = Bm[b, t, n]
                    cn = Cm[b, t, n]
                    a_n = A_t[n, d0: d0 + w]
                    dec = decay[i, n]
                    prev = states[i, n]
                    cur = states[i + 1, n]
                    gh_n = grad_h[n]
                    ga_n = grad_A[b, n, d0: d0 + w]
                    acc_c = np.float32(0.0)
                    acc_b = np.float32(0.0)
                    for j in range(w):
                        acc_c += g[j] * cur[j]
                        gh = gh_n[j] + g[j] * cn
                        ah = gh * dec[j] * prev[j]
                        g_dt[j] += ah * a_n[j] + gh * bn * ut[j]
                        g_u[j] += gh * dt[j] * bn
                        acc_b += gh * dtu[j]
                        ga_n[j] += ah * dt[j]
                        gh_n[j] = gh * dec[j]
                    gC[t, n] = acc_c
                    gB[t, n] = acc_b
                for j in range(w):  # through the softplus: its derivative is the sigmoid
                    g_dt[j] = g_dt[j] / (np.float32(1.0) + fast_exp(-(raw[j] + bias_k[j])))
    return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z


class _FusedCPUScan(torch.autograd.Function):
    """SiLU(z) * (scan(u, softplus(delta + delta_bias)) + D u) on CPU. u, delta, z:
    [batch, L, d_inner]; delta_bias, D: [d_inner]; A: [d_inner, N]; B, C: [batch, L, N]."""

    @staticmethod
    def forward(ctx, u, delta, delta_bias, A, Bm, Cm, D, z):
        use_torch_threads()
        arrays = [as_numpy(t) for t in (u, delta, delta_bias, A.t(), Bm, Cm, D, z)]
        out, checkpoints = _scan_forward(*arrays, BLOCK, CHUNK)
        ctx.arrays = arrays + [checkpoints]
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        use_torch_threads()
        grads = _scan_backward(as_numpy(grad_out), *ctx.arrays, BLOCK, CHUNK)
        del ctx.arrays
        g_u, g_delta, g_A, g_B, g_C, g_D, g_z = (torch.from_numpy(g) for g in grads)
        return (g_u, g_delta, g_delta.sum((0, 1)), g_A.sum(0).t(), g_B.sum(1), g_C.sum(1), g_D.sum(0),
                g_z)


def selective_scan_reference(u, delta, A, Bm, Cm) -> torch.Tensor:
    """Plain recurrence: u, delta [batch, L, d_inner], A [d_inner, N], B, C [batch, L, N]
    -> y [batch, L, d_inner]."""
    decay = torch.exp(delta[..., None] * A)  # [batch, L, d_inner, N]
    drive = (delta * u)[..., None] * Bm[:, :, None, :]
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(1), drive.unbind(1), Cm.unbind(1)):
        h = a_t * h + b_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


SCANS = ("auto", "mamba_ssm", "triton", "fused", "reference")  # what `train.scan` may name
ScanName = Literal["auto", "mamba_ssm", "triton", "fused", "reference"]
_preferred: list[str] = ["auto"]  # the process's choice (`use_scan`); modules built with impl="auto" follow it
_announced: set[tuple[str, str]] = set()


def use_scan(name: str) -> None:
    """Make `name` the scan every Mamba block with impl="auto" runs in this process (like torch's
    backend switches: the scan is a property of the machine, not of the model's weights)."""
    if name not in SCANS:
        raise ConfigError(f"scan {name!r} is not one of {list(SCANS)}")
    _preferred[0] = name


@lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None when `module` (with its compiled kernels) imports, else the reason, on one line."""
    try:
        if module == "mamba_ssm":
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
            import selective_scan_cuda  # noqa: F401  (the compiled kernel itself)
        else:
            import triton  # noqa: F401
    except Exception as err:  # not installed, installed without its CUDA build, or built for another torch
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_scan(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(the scan that runs on `device`, why): auto picks mamba_ssm's kernel, else the Triton kernel on
    CUDA, the numba kernels on CPU and the plain loop elsewhere. A scan asked for by name that cannot
    run here raises ConfigError with the reason (the import error, or the device)."""
    requested = _preferred[0] if requested == "auto" else requested
    kind = torch.device(device).type
    if requested == "auto":
        if kind == "cpu":
            return "fused", "numba kernels on CPU"
        if kind != "cuda":
            return "reference", f"no kernel for {kind}: the plain PyTorch loop"
        if _import_error("mamba_ssm") is None:
            return "mamba_ssm", "mamba_ssm's CUDA kernel"
        if _import_error("triton") is None:
            return "triton", f"diffcraft's Triton kernel (mamba_ssm not importable: {_import_error('mamba_ssm')})"
        return "reference", (f"the plain PyTorch loop, about 20x slower: neither mamba_ssm "
                             f"({_import_error('mamba_ssm')}) nor triton ({_import_error('triton')}) imports")
    if requested not in SCANS:
        raise ConfigError(f"scan {requested!r} is not one of {list(SCANS)}")
    if requested == "mamba_ssm" and _import_error("mamba_ssm"):
        raise ConfigError(f"scan 'mamba_ssm' was asked for but cannot be imported ({_import_error('mamba_ssm')}); "
                          f"install the gpu extra (pip install -e '.[gpu]') or use scan 'auto'")
    if requested == "triton" and _import_error("triton"):
        raise ConfigError(f"scan 'triton' was asked for but cannot be imported ({_import_error('triton')})")
    runs_on = {"mamba_ssm": ("cuda",), "triton": ("cuda", "cpu") if _interpreted() else ("cuda",),
               "fused": ("cpu",)}.get(requested)
    if runs_on and kind not in runs_on:
        raise ConfigError(f"scan {requested!r} runs on {' or '.join(runs_on)}, not on {kind}")
    return requested, "asked for by name"


def announce_scan(device: torch.device | str, requested: str = "auto") -> str:
    """The scan that runs on `device`, said once per process and device type (stderr)."""
    name, why = resolve_scan(requested, device)
    key = (torch.device(device).type, name)
    if key not in _announced:
        _announced.add(key)
        print(f"diffcraft: Mamba scan on {key[0]}: {name} ({why})", file=sys.stderr)
    return name


def kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The one dtype a kernel receives: autocast's when it is on (its outputs are mixed: a
    convolution promoted to float32 beside bfloat16 projections), else the inputs' common type."""
    kind = tensors[0].device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, impl: str = "auto") -> torch.Tensor:
    """Mamba's scan with its skip and gate: SiLU(z) * (scan(u, softplus(delta + bias)) + D u).

    u, delta, z: [batch, L, d_inner]; A: [d_inner, N]; Bm, Cm: [batch, L, N]; D, delta_bias:
    [d_inner] -> [batch, L, d_inner]. impl: one of SCANS (auto: the process's choice, by device).
    """
    impl = announce_scan(u.device, impl)
    if impl in ("mamba_ssm", "triton"):
        dtype = kernel_dtype(u, delta, z, Bm, Cm)
        u, delta, z, Bm, Cm = (t.to(dtype) for t in (u, delta, z, Bm, Cm))
    if impl == "mamba_ssm":  # its kernel takes [batch, d_inner, L] and [batch, N, L]
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        y = selective_scan_fn(u.transpose(1, 2), delta.transpose(1, 2), A.float(),
                              Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
                              D.float(), z.transpose(1, 2), delta_bias.float(), delta_softplus=True)
        return y.transpose(1, 2)
    if impl == "triton":
        from diffcraft.nn.scan_triton import TritonScan

        return TritonScan.apply(u, delta, delta_bias, A, Bm, Cm, D, z)
    if impl == "fused":
        return _FusedCPUScan.apply(u, delta, delta_bias, A, Bm, Cm, D, z)
    delta = F.softplus(delta + delta_bias)
    return (selective_scan_reference(u, delta, A, Bm, Cm) + u * D) * F.silu(z)
