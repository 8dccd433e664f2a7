"""The selective scan of Mamba: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <h_t, C_t>.

Three implementations of one function, chosen by device:
- CUDA with mamba_ssm importable: its fused kernel (`selective_scan_fn`).
- CPU: fused numba kernels (softplus of Δ, the scan, the D skip and the SiLU gate in one pass,
  exp by a vectorised polynomial), parallel over batch x channels. The forward keeps the state only at
  chunk boundaries ([batch, channels, L / chunk, state]); the backward recomputes each chunk's
  states and runs the adjoint recurrence backwards, so no [batch, L, channels, state] tensor is
  ever built.
- `selective_scan_reference`: the plain step-by-step recurrence in PyTorch (the mamba_ssm
  `selective_scan_ref` math), for tests and any other device. It unbinds the sequence instead of
  indexing one step at a time, which made backward about 400x slower.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F

CHUNK = 16
_OPTS = dict(parallel=True, fastmath=True, cache=True, nogil=True)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(1.4286068203094172e-06)


@numba.njit(fastmath=True, cache=True, inline="always")
def _exp_into(out, x, scale, bits, bits_as_float):  # pragma: no cover - compiled
    """out[n] = exp(x[n] * scale) for x * scale <= 0, in two loops the compiler vectorises:
    2^k from the exponent bits, e^f by a degree-7 polynomial on |f| <= ln2 / 2 (Cody-Waite)."""
    for n in range(x.shape[0]):
        v = max(x[n] * scale, np.float32(-87.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        f = v - k * _LN2_HI - k * _LN2_LO
        out[n] = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (
            np.float32(1 / 6) + f * (np.float32(1 / 24) + f * (np.float32(1 / 120) + f * (
                np.float32(1 / 720) + f * np.float32(1 / 5040)))))))
        bits[n] = (np.int32(k) + np.int32(127)) << 23
    for n in range(x.shape[0]):
        out[n] *= bits_as_float[n]


@numba.njit(fastmath=True, cache=True, inline="always")
def _softplus(x):  # pragma: no cover - compiled
    return x if x > 20.0 else np.log1p(np.exp(x))


@numba.njit(**_OPTS)
def _scan_forward(u, delta_raw, delta_bias, A, Bm, Cm, D, z, chunk):  # pragma: no cover - compiled
    """out = SiLU(z) * (scan(u, softplus(delta_raw + bias)) + D u); states kept every `chunk`."""
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    n_chunks = (length + chunk - 1) // chunk
    out = np.empty((batch, d_inner, length), dtype=np.float32)
    checkpoints = np.empty((batch, d_inner, n_chunks, n_state), dtype=np.float32)
    for job in numba.prange(batch * d_inner):
        b, d = job // d_inner, job % d_inner
        h = np.zeros(n_state, dtype=np.float32)
        decay = np.empty(n_state, dtype=np.float32)
        bits = np.empty(n_state, dtype=np.int32)
        bits_f = bits.view(np.float32)
        a_row = A[d]
        for t in range(length):
            if t % chunk == 0:
                checkpoints[b, d, t // chunk] = h
            dt = _softplus(delta_raw[b, d, t] + delta_bias[d])
            ut = u[b, d, t]
            du = dt * ut
            _exp_into(decay, a_row, dt, bits, bits_f)
            acc = np.float32(0.0)
            for n in range(n_state):
                h[n] = decay[n] * h[n] + du * Bm[b, t, n]
                acc += h[n] * Cm[b, t, n]
            zt = z[b, d, t]
            out[b, d, t] = (acc + D[d] * ut) * zt / (np.float32(1.0) + np.exp(-zt))
    return out, checkpoints


@numba.njit(**_OPTS)
def _scan_backward(grad_out, u, delta_raw, delta_bias, A, Bm, Cm, D, z, checkpoints, chunk,
                   n_split):  # pragma: no cover - compiled
    batch, d_inner, length = u.shape
    n_state = A.shape[1]
    n_chunks = checkpoints.shape[2]
    grad_u = np.empty_like(u)
    grad_delta = np.empty_like(delta_raw)
    grad_z = np.empty_like(z)
    grad_A = np.zeros((batch, d_inner, n_state), dtype=np.float32)
    grad_D = np.zeros((batch, d_inner), dtype=np.float32)
    grad_bias = np.zeros((batch, d_inner), dtype=np.float32)
    grad_B = np.zeros((batch, n_split, length, n_state), dtype=np.float32)
    grad_C = np.zeros((batch, n_split, length, n_state), dtype=np.float32)
    per_split = (d_inner + n_split - 1) // n_split
    for job in numba.prange(batch * n_split):
        b, s = job // n_split, job % n_split
        states = np.empty((chunk + 1, n_state), dtype=np.float32)
        decay = np.empty((chunk, n_state), dtype=np.float32)
        bits = np.empty(n_state, dtype=np.int32)
        bits_f = bits.view(np.float32)
        grad_h = np.empty(n_state, dtype=np.float32)
        for d in range(s * per_split, min(d_inner, (s + 1) * per_split)):
            a_row = A[d]
            grad_h[:] = 0.0
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                t1 = min(length, t0 + chunk)
                states[0] = checkpoints[b, d, c]
                for t in range(t0, t1):  # recompute the chunk's states
                    i = t - t0
                    dt = _softplus(delta_raw[b, d, t] + delta_bias[d])
                    du = dt * u[b, d, t]
                    _exp_into(decay[i], a_row, dt, bits, bits_f)
                    for n in range(n_state):
                        states[i + 1, n] = decay[i, n] * states[i, n] + du * Bm[b, t, n]
                for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, backwards in time
                    i = t - t0
                    x = delta_raw[b, d, t] + delta_bias[d]
                    dt = _softplus(x)
                    ut = u[b, d, t]
                    zt = z[b, d, t]
                    sig = np.float32(1.0) / (np.float32(1.0) + np.exp(-zt))
                    y0 = np.float32(0.0)
                    for n in range(n_state):
                        y0 += states[i + 1, n] * Cm[b, t, n]
                    pre = y0 + D[d] * ut
                    g_out = grad_out[b, d, t]
                    grad_z[b, d, t] = g_out * pre * sig * (np.float32(1.0) + zt * (np.float32(1.0) - sig))
                    g = g_out * zt * sig  # gradient reaching the scan output y0
                    grad_D[b, d] += g * ut
                    g_dt = np.float32(0.0)
                    g_u = g * D[d]
                    for n in range(n_state):
                        h_prev = states[i, n]
                        a = decay[i, n]
                        bt = Bm[b, t, n]
                        grad_C[b, s, t, n] += g * states[i + 1, n]
                        gh = grad_h[n] + g * Cm[b, t, n]
                        g_dt += gh * (a_row[n] * a * h_prev + bt * ut)
                        g_u += gh * dt * bt
                        grad_B[b, s, t, n] += gh * dt * ut
                        grad_A[b, d, n] += gh * dt * a * h_prev
                        grad_h[n] = gh * a
                    g_x = g_dt / (np.float32(1.0) + np.exp(-x))  # softplus' = sigmoid
                    grad_delta[b, d, t] = g_x
                    grad_bias[b, d] += g_x
                    grad_u[b, d, t] = g_u
    return grad_u, grad_delta, grad_bias, grad_A, grad_B, grad_C, grad_D, grad_z


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _FusedCPUScan(torch.autograd.Function):
    """The whole Mamba scan on CPU: u, delta_raw, z [batch, d_inner, L], delta_bias, D [d_inner],
    A [d_inner, N], B, C [batch, L, N] -> SiLU(z) * (scan + D u)."""

    @staticmethod
    def forward(ctx, u, delta_raw, delta_bias, A, Bm, Cm, D, z):
        _use_torch_threads()
        arrays = [_numpy(t) for t in (u, delta_raw, delta_bias, A, Bm, Cm, D, z)]
        out, checkpoints = _scan_forward(*arrays, CHUNK)
        ctx.arrays = arrays + [checkpoints]
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        _use_torch_threads()
        u = ctx.arrays[0]
        n_split = max(1, min(u.shape[1], -(-2 * numba.get_num_threads() // u.shape[0])))
        grads = _scan_backward(_numpy(grad_out), *ctx.arrays, CHUNK, n_split)
        del ctx.arrays
        g_u, g_delta, g_bias, g_A, g_B, g_C, g_D, g_z = (torch.from_numpy(g) for g in grads)
        return g_u, g_delta, g_bias.sum(0), g_A.sum(0), g_B.sum(1), g_C.sum(1), g_D.sum(0), g_z


def selective_scan_reference(u, delta, A, Bm, Cm) -> torch.Tensor:
    """Plain recurrence; same arguments as the fused scan -> y [batch, d_inner, L]."""
    decay = torch.exp(delta[..., None] * A[None, :, None, :])  # [batch, d, L, N]
    drive = (delta * u)[..., None] * Bm[:, None, :, :]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(2), drive.unbind(2), Cm.unbind(1)):
        h = a_t * h + b_t
        ys.append((h * c_t[:, None, :]).sum(-1))
    return torch.stack(ys, dim=-1)


def _mamba_ssm_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA build
        return None
    return selective_scan_fn


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, impl: str = "auto") -> torch.Tensor:
    """Mamba's scan with its skip and gate: SiLU(z) * (scan(u, softplus(delta + bias)) + D u).

    u, delta, z: [batch, d_inner, L]; A: [d_inner, N]; Bm, Cm: [batch, L, N] -> [batch, d_inner, L].
    impl: auto | fused | reference | mamba_ssm.
    """
    if impl == "auto":
        if u.is_cuda and _mamba_ssm_scan() is not None:
            impl = "mamba_ssm"
        else:
            impl = "fused" if u.device.type == "cpu" else "reference"
    if impl == "mamba_ssm":
        scan_fn = _mamba_ssm_scan()
        return scan_fn(u, delta, A, Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),
                       D.float(), z, delta_bias.float(), delta_softplus=True)
    if impl == "fused":
        return _FusedCPUScan.apply(u, delta, delta_bias, A, Bm, Cm, D, z)
    if impl != "reference":
        raise ValueError(f"scan implementation {impl!r} is not auto, fused, reference or mamba_ssm")
    y = selective_scan_reference(u, F.softplus(delta + delta_bias[None, :, None]), A, Bm, Cm)
    return (y + u * D[None, :, None]) * F.silu(z)
