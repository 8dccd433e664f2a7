"""Mamba's selective scan as Triton kernels: a fast scan on any CUDA GPU with nothing to compile.

The same fused function as the CPU numba kernels (`nn.scan`): the Δ bias and softplus, the scan,
the D skip and the SiLU gate in one pass, in the [batch, L, channels] layout the projections
produce. One program per (batch item, block of channels) walks time in order, holding its block's
state [d_state, channels] in registers; every channel is independent, so the grid covers the GPU
with batch x channels / BLOCK_D programs. Each step's inputs are loaded one step ahead.

The forward keeps the state only at the start of every CHUNK steps. The backward walks the chunks
from the last: it recomputes a chunk's states into a small per-program scratch buffer (it stays in
L2), then runs the adjoint recurrence backwards through the chunk, so no [batch, L, channels,
state] tensor is ever built. Partial sums over a program's channels (the B and C gradients) and
over its time steps (A, D) go to per-program rows that the caller adds up.

Kernels compute in float32 and read and write the dtype they are handed (one dtype for u, Δ, z, B
and C: `scan.kernel_dtype`). Under `TRITON_INTERPRET=1` they run on CPU tensors, which is how the
tests check them without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16  # time steps between stored states
BLOCK_D = 32  # channels per program
NUM_WARPS = 1  # one warp: a thread owns a channel's whole state, so sums over the state stay in-thread


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_step(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, row, col, t, lo, hi, DIN, N, d, n, md, mn):
    """Step t's rows: u, raw Δ, z [BLOCK_D] and B, C [BLOCK_N] as float32; zeros unless lo <= t < hi.
    (The masks are built as vectors: Triton's interpreter refuses a scalar condition in a mask.)"""
    okd = md & (d * 0 + t >= lo) & (d * 0 + t < hi)
    okn = mn & (n * 0 + t >= lo) & (n * 0 + t < hi)
    u = tl.load(u_ptr + row + t * DIN, mask=okd, other=0.0).to(tl.float32)
    raw = tl.load(delta_ptr + row + t * DIN, mask=okd, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row + t * DIN, mask=okd, other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + col + t * N, mask=okn, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + col + t * N, mask=okn, other=0.0).to(tl.float32)
    return u, raw, z, Bt, Ct


@triton.jit
def _program_block(A_ptr, bias_ptr, D_ptr, L, DIN, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's batch item b and channels d (states n), their masks, its block of A
    [BLOCK_N, BLOCK_D], Δ bias and D skip (float32), and the offsets of (b, 0, d) and (b, 0, n)."""
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    md, mn = d < DIN, n < N
    mnd = mn[:, None] & md[None, :]
    A = tl.load(A_ptr + d[None, :] * N + n[:, None], mask=mnd, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    skip = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    return b, d, n, md, mn, mnd, A, bias, skip, b * L * DIN + d, b * L * N + n


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr, ckpt_ptr,
                     L, DIN, N, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = SiLU(z) * (scan(u, softplus(Δ + bias)) + D u); the state at every chunk start -> ckpt."""
    b, d, n, md, mn, mnd, A, bias, skip, row, col = _program_block(A_ptr, bias_ptr, D_ptr, L, DIN, N, BLOCK_D, BLOCK_N)
    n_chunks = tl.cdiv(L, CHUNK)
    ckpt = ckpt_ptr + b * n_chunks * N * DIN + n[:, None] * DIN + d[None, :]
    h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    u, raw, z, Bt, Ct = _load_step(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, row, col, 0, 0, L, DIN, N, d, n, md, mn)
    for t in range(L):
        if t % CHUNK == 0:
            tl.store(ckpt + (t // CHUNK) * N * DIN, h, mask=mnd)
        u1, raw1, z1, B1, C1 = _load_step(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, row, col, t + 1, 0, L, DIN, N, d, n,
                                          md, mn)
        dt = _softplus(raw + bias)
        h = tl.exp(dt[None, :] * A) * h + (dt * u)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0) + skip * u
        tl.store(out_ptr + row + t * DIN, y * z * _sigmoid(z), mask=md)
        u, raw, z, Bt, Ct = u1, raw1, z1, B1, C1


@triton.jit
def _scan_bwd_kernel(grad_out_ptr, u_ptr, delta_ptr, bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, ckpt_ptr,
                     scratch_ptr, grad_u_ptr, grad_delta_ptr, grad_z_ptr, grad_A_ptr, grad_B_ptr, grad_C_ptr,
                     grad_D_ptr, L, DIN, N, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gradients of the forward's output: u, raw Δ, z [batch, L, DIN] in full; A [batch, DIN, N] and
    D [batch, DIN] summed over this program's steps; B and C [batch, channel blocks, L, N] summed over its
    channels (the caller adds up the partial rows; the Δ bias's gradient is grad Δ summed)."""
    b, d, n, md, mn, mnd, A, bias, skip, row, col = _program_block(A_ptr, bias_ptr, D_ptr, L, DIN, N, BLOCK_D, BLOCK_N)
    k = tl.program_id(0)
    n_chunks = tl.cdiv(L, CHUNK)
    ckpt = ckpt_ptr + b * n_chunks * N * DIN + n[:, None] * DIN + d[None, :]
    tile = n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    scratch = scratch_ptr + (b * tl.num_programs(0) + k) * (CHUNK + 1) * BLOCK_N * BLOCK_D + tile
    partial = (b * tl.num_programs(0) + k) * L * N + n  # this program's row of the B and C partial sums
    grad_h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # d loss / d h_t from the steps after t
    grad_A = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_D = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c_back in range(n_chunks):
        c = n_chunks - 1 - c_back
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, L)
        h = tl.load(ckpt + c * N * DIN, mask=mnd, other=0.0)
        tl.store(scratch, h)  # slot i + 1 holds h at step t0 + i; slot 0 the state before the chunk
        for t in range(t0, t1):  # recompute the chunk's states
            u = tl.load(u_ptr + row + t * DIN, mask=md, other=0.0).to(tl.float32)
            raw = tl.load(delta_ptr + row + t * DIN, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + col + t * N, mask=mn, other=0.0).to(tl.float32)
            dt = _softplus(raw + bias)
            h = tl.exp(dt[None, :] * A) * h + (dt * u)[None, :] * Bt[:, None]
            tl.store(scratch + (t - t0 + 1) * BLOCK_N * BLOCK_D, h)
        tl.debug_barrier()
        # the adjoint recurrence, backwards in time; h is the state at step t on entry
        last = t1 - 1
        u, raw, z, Bt, Ct = _load_step(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, row, col, last, t0, t1, DIN, N, d, n,
                                       md, mn)
        go = tl.load(grad_out_ptr + row + last * DIN, mask=md, other=0.0).to(tl.float32)
        for i in range(t1 - t0):
            t = last - i
            h_prev = tl.load(scratch + (t - t0) * BLOCK_N * BLOCK_D)
            u1, raw1, z1, B1, C1 = _load_step(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, row, col, t - 1, t0, t1, DIN, N, d,
                                              n, md, mn)
            go1 = tl.load(grad_out_ptr + row + (t - 1) * DIN, mask=md & (d * 0 + t - 1 >= t0), other=0.0).to(tl.float32)
            dt = _softplus(raw + bias)
            decay = tl.exp(dt[None, :] * A)
            gate = _sigmoid(z)
            y0 = tl.sum(h * Ct[:, None], axis=0) + skip * u
            tl.store(grad_z_ptr + row + t * DIN, go * y0 * gate * (1.0 + z * (1.0 - gate)), mask=md)
            g = go * z * gate  # gradient reaching the scan's output
            grad_D += g * u
            grad_h += g[None, :] * Ct[:, None]  # now the whole d loss / d h_t
            tl.store(grad_C_ptr + partial + t * N, tl.sum(g[None, :] * h, axis=1), mask=mn)
            through_decay = grad_h * decay * h_prev
            grad_dt = tl.sum(through_decay * A + grad_h * Bt[:, None] * u[None, :], axis=0)
            grad_u = g * skip + tl.sum(grad_h * Bt[:, None], axis=0) * dt
            tl.store(grad_B_ptr + partial + t * N, tl.sum(grad_h * (dt * u)[None, :], axis=1), mask=mn)
            grad_A += through_decay * dt[None, :]
            grad_h = grad_h * decay
            tl.store(grad_u_ptr + row + t * DIN, grad_u, mask=md)
            tl.store(grad_delta_ptr + row + t * DIN, grad_dt * _sigmoid(raw + bias), mask=md)  # softplus' = sigmoid
            h = h_prev
            u, raw, z, Bt, Ct, go = u1, raw1, z1, B1, C1, go1
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(grad_A_ptr + b * DIN * N + d[None, :] * N + n[:, None], grad_A, mask=mnd)
    tl.store(grad_D_ptr + b * DIN + d, grad_D, mask=md)


def _grid(batch: int, d_inner: int, block_d: int) -> tuple[int, int]:
    return triton.cdiv(d_inner, block_d), batch


class TritonScan(torch.autograd.Function):
    """SiLU(z) * (scan(u, softplus(delta + delta_bias)) + D u). u, delta, z: [batch, L, d_inner];
    Bm, Cm: [batch, L, N] (all five of one dtype); A: [d_inner, N]; delta_bias, D: [d_inner]."""

    @staticmethod
    def forward(ctx, u, delta, delta_bias, A, Bm, Cm, D, z, block_d: int = BLOCK_D, num_warps: int = NUM_WARPS):
        u, delta, z, Bm, Cm = (t.contiguous() for t in (u, delta, z, Bm, Cm))
        A, D, delta_bias = (t.float().contiguous() for t in (A, D, delta_bias))
        batch, length, d_inner = u.shape
        n_state = A.shape[1]
        out = torch.empty_like(u)
        ckpt = torch.empty(batch, triton.cdiv(length, CHUNK), n_state, d_inner, device=u.device, dtype=torch.float32)
        _scan_fwd_kernel[_grid(batch, d_inner, block_d)](
            u, delta, delta_bias, A, Bm, Cm, D, z, out, ckpt, length, d_inner, n_state,
            CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=triton.next_power_of_2(n_state), num_warps=num_warps)
        ctx.save_for_backward(u, delta, delta_bias, A, Bm, Cm, D, z, ckpt)
        ctx.block_d, ctx.num_warps = block_d, num_warps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, delta, delta_bias, A, Bm, Cm, D, z, ckpt = ctx.saved_tensors
        block_d, num_warps = ctx.block_d, ctx.num_warps
        batch, length, d_inner = u.shape
        n_state = A.shape[1]
        block_n = triton.next_power_of_2(n_state)
        grid = _grid(batch, d_inner, block_d)
        f32 = {"device": u.device, "dtype": torch.float32}
        scratch = torch.empty(batch * grid[0], CHUNK + 1, block_n, block_d, **f32)
        grad_u, grad_delta, grad_z = (torch.empty(u.shape, **f32) for _ in range(3))
        grad_A = torch.empty(batch, d_inner, n_state, **f32)
        grad_D = torch.empty(batch, d_inner, **f32)
        grad_B, grad_C = (torch.empty(batch, grid[0], length, n_state, **f32) for _ in range(2))
        _scan_bwd_kernel[grid](
            grad_out.contiguous(), u, delta, delta_bias, A, Bm, Cm, D, z, ckpt, scratch, grad_u, grad_delta,
            grad_z, grad_A, grad_B, grad_C, grad_D, length, d_inner, n_state,
            CHUNK=CHUNK, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=num_warps)
        dtype = u.dtype
        return (grad_u.to(dtype), grad_delta.to(dtype), grad_delta.sum((0, 1)), grad_A.sum(0),
                grad_B.sum(1).to(dtype), grad_C.sum(1).to(dtype), grad_D.sum(0), grad_z.to(dtype), None, None)
