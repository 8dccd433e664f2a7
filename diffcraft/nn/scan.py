"""The selective scan of Mamba: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <h_t, C_t>.

Three implementations of one function, chosen by device:
- CUDA with mamba_ssm importable: its fused kernel (`selective_scan_fn`).
- CPU: fused numba kernels (the scan, the D skip and the SiLU gate in one pass, exp by a
  vectorised polynomial), one job per (batch item, block of 32 channels), vectorised over the
  channels of the block, in the [batch, L, channels] layout the projections produce (no
  transposes). The forward keeps the state only every 16 steps; the backward recomputes each
  chunk's states and runs the adjoint recurrence backwards, so no [batch, L, channels, state]
  tensor is ever built.
- `selective_scan_reference`: the plain step-by-step recurrence in PyTorch (the mamba_ssm
  `selective_scan_ref` math), for tests and any other device. It unbinds the sequence instead of
  indexing one step at a time, which made backward about 400x slower.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic
import torch
import torch.nn.functional as F

CHUNK = 16  # time steps between stored states
BLOCK = 64  # channels per job: the vector width of the kernels
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.4286068203094172e-06)


@intrinsic
def _bits_to_float(typingctx, bits):
    """Reinterpret an int32's bits as a float32 (an LLVM bitcast, free and vectorisable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


@numba.njit(fastmath=True, cache=True, inline="always")
def _fast_exp(v):  # pragma: no cover - compiled
    """exp(v) for float32 v, clamped to [-87, 87]: 2^k from the exponent bits times e^f from a
    degree-7 polynomial on |f| <= ln2 / 2 (Cody-Waite reduction). Relative error about 1e-7, and
    plain scalar code, so loops around it vectorise (libm's expf call does not)."""
    v = min(max(v, np.float32(-87.0)), np.float32(87.0))
    k = np.floor(v * _LOG2E + np.float32(0.5))
    f = v - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (
        np.float32(1 / 6) + f * (np.float32(1 / 24) + f * (np.float32(1 / 120) + f * (
            np.float32(1 / 720) + f * np.float32(1 / 5040)))))))
    return p * _bits_to_float((np.int32(k) + np.int32(127)) << 23)


@numba.njit(**_OPTS)
def _scan_forward(u, delta, A_t, Bm, Cm, D, z, block, chunk):  # pragma: no cover - compiled
    """out = SiLU(z) * (scan(u, delta) + D u), all [batch, L, d_inner]; A_t is A transposed
    [N, d_inner]. One job per (batch, block of channels); vectors run over the channels."""
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
        acc = np.empty(w, dtype=np.float32)
        for t in range(length):
            if t % chunk == 0:
                checkpoints[b, t // chunk, :, d0: d0 + w] = h
            dt = delta[b, t, d0: d0 + w]
            ut = u[b, t, d0: d0 + w]
            acc[:] = 0.0
            for n in range(n_state):
                bn = Bm[b, t, n]
                cn = Cm[b, t, n]
                a_n = A_t[n, d0: d0 + w]
                h_n = h[n]
                for j in range(w):
                    hj = _fast_exp(dt[j] * a_n[j]) * h_n[j] + dt[j] * ut[j] * bn
                    h_n[j] = hj
                    acc[j] += hj * cn
            zt = z[b, t, d0: d0 + w]
            for j in range(w):
                out[b, t, d0 + j] = (acc[j] + D[d0 + j] * ut[j]) * zt[j] / (np.float32(1.0) + _fast_exp(-zt[j]))
    return out, checkpoints


@numba.njit(**_OPTS)
def _scan_backward(grad_out, u, delta, A_t, Bm, Cm, D, z, checkpoints, block,
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
        g = np.empty(w, dtype=np.float32)
        g_dt = np.empty(w, dtype=np.float32)
        g_u = np.empty(w, dtype=np.float32)
        y0 = np.empty(w, dtype=np.float32)
        sig = np.empty(w, dtype=np.float32)
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(length, t0 + chunk)
            states[0] = checkpoints[b, c, :, d0: d0 + w]
            for t in range(t0, t1):  # recompute the chunk's states
                i = t - t0
                dt = delta[b, t, d0: d0 + w]
                ut = u[b, t, d0: d0 + w]
                for n in range(n_state):
                    bn = Bm[b, t, n]
                    a_n = A_t[n, d0: d0 + w]
                    dec = decay[i, n]
                    prev = states[i, n]
                    nxt = states[i + 1, n]
                    for j in range(w):
                        a = _fast_exp(dt[j] * a_n[j])
                        dec[j] = a
                        nxt[j] = a * prev[j] + dt[j] * ut[j] * bn
            for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, backwards in time
                i = t - t0
                dt = delta[b, t, d0: d0 + w]
                ut = u[b, t, d0: d0 + w]
                zt = z[b, t, d0: d0 + w]
                go = grad_out[b, t, d0: d0 + w]
                for j in range(w):
                    sig[j] = _fast_exp(-zt[j])
                y0[:] = 0.0
                for n in range(n_state):
                    cn = Cm[b, t, n]
                    for j in range(w):
                        y0[j] += states[i + 1, n, j] * cn
                for j in range(w):
                    s = np.float32(1.0) / (np.float32(1.0) + sig[j])
                    pre = y0[j] + D[d0 + j] * ut[j]
                    grad_z[b, t, d0 + j] = go[j] * pre * s * (np.float32(1.0) + zt[j] * (np.float32(1.0) - s))
                    g[j] = go[j] * zt[j] * s  # gradient reaching the scan output
                    grad_D[b, d0 + j] += g[j] * ut[j]
                    g_u[j] = g[j] * D[d0 + j]
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
                        ah = dec[j] * prev[j]
                        g_dt[j] += gh * (a_n[j] * ah + bn * ut[j])
                        g_u[j] += gh * dt[j] * bn
                        acc_b += gh * dt[j] * ut[j]
                        ga_n[j] += gh * dt[j] * ah
                        gh_n[j] = gh * dec[j]
                    grad_C[b, k, t, n] = acc_c
                    grad_B[b, k, t, n] = acc_b
                for j in range(w):
                    grad_delta[b, t, d0 + j] = g_dt[j]
                    grad_u[b, t, d0 + j] = g_u[j]
    return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _FusedCPUScan(torch.autograd.Function):
    """SiLU(z) * (scan(u, delta) + D u) on CPU. u, delta (after softplus), z: [batch, L, d_inner];
    A: [d_inner, N]; B, C: [batch, L, N]; D: [d_inner]."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, z):
        _use_torch_threads()
        arrays = [_numpy(t) for t in (u, delta, A.t(), Bm, Cm, D, z)]
        out, checkpoints = _scan_forward(*arrays, BLOCK, CHUNK)
        ctx.arrays = arrays + [checkpoints]
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        _use_torch_threads()
        grads = _scan_backward(_numpy(grad_out), *ctx.arrays, BLOCK, CHUNK)
        del ctx.arrays
        g_u, g_delta, g_A, g_B, g_C, g_D, g_z = (torch.from_numpy(g) for g in grads)
        return g_u, g_delta, g_A.sum(0).t(), g_B.sum(1), g_C.sum(1), g_D.sum(0), g_z


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


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA build
        return None
    return selective_scan_fn


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, impl: str = "auto") -> torch.Tensor:
    """Mamba's scan with its skip and gate: SiLU(z) * (scan(u, softplus(delta + bias)) + D u).

    u, delta, z: [batch, L, d_inner]; A: [d_inner, N]; Bm, Cm: [batch, L, N]; D, delta_bias:
    [d_inner] -> [batch, L, d_inner]. impl: auto | fused | reference | mamba_ssm.
    """
    if impl == "auto":
        if u.is_cuda and _mamba_ssm_scan() is not None:
            impl = "mamba_ssm"
        else:
            impl = "fused" if u.device.type == "cpu" else "reference"
    if impl == "mamba_ssm":  # its kernel takes [batch, d_inner, L] and [batch, N, L]
        y = _mamba_ssm_scan()(u.transpose(1, 2), delta.transpose(1, 2), A,
                              Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
                              D.float(), z.transpose(1, 2), delta_bias.float(), delta_softplus=True)
        return y.transpose(1, 2)
    delta = F.softplus(delta + delta_bias)
    if impl == "fused":
        return _FusedCPUScan.apply(u, delta, A, Bm, Cm, D, z)
    if impl != "reference":
        raise ValueError(f"scan implementation {impl!r} is not auto, fused, reference or mamba_ssm")
    return (selective_scan_reference(u, delta, A, Bm, Cm) + u * D) * F.silu(z)
