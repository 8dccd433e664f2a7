"""Mamba's selective scan alone, forward + backward, at the decoder's shape (batch 16, 400 frames,
d_inner 1024, d_state 16): every implementation that runs on the device, side by side, and with
`--sweep` the Triton kernel's channel block and warp count (what `nn.scan_triton` defaults to
should be the fastest row).

Run: python benchmarks/scan.py [--device cuda] [--dtype float32|bfloat16] [--sweep]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

BATCH, FRAMES, D_INNER, D_STATE = 16, 400, 1024, 16


def inputs(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(BATCH, FRAMES, D_INNER, generator=g) for _ in range(3))
    A = -torch.rand(D_INNER, D_STATE, generator=g) * 4
    Bm, Cm = (torch.randn(BATCH, FRAMES, D_STATE, generator=g) for _ in range(2))
    D, bias = torch.randn(D_INNER, generator=g), torch.randn(D_INNER, generator=g) * 0.5
    return ([t.to(device, dtype).requires_grad_() for t in (u, delta - 1)] + [A.to(device).requires_grad_()]
            + [t.to(device, dtype).requires_grad_() for t in (Bm, Cm)] + [D.to(device).requires_grad_()]
            + [z.to(device, dtype).requires_grad_(), bias.to(device).requires_grad_()])


def timed(fn, device: str, rounds: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(rounds + 2):  # two warm-ups: compilation, allocator
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    from diffcraft.nn.scan import _import_error, selective_scan

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="the Triton kernel's block sizes and warps")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    x = inputs(args.device, dtype)
    weights = torch.randn(BATCH, FRAMES, D_INNER, device=args.device, dtype=dtype)

    def pass_(run):
        for t in x:
            t.grad = None
        (run() * weights).float().sum().backward()

    impls = {"cpu": ["fused", "reference"], "cuda": ["mamba_ssm", "triton", "reference"]}.get(args.device, ["reference"])
    print(f"{args.device}, {args.dtype}, batch {BATCH} x {FRAMES} frames, d_inner {D_INNER}, d_state {D_STATE}: "
          f"forward + backward, median of {args.rounds}")
    for impl in impls:
        if impl == "mamba_ssm" and _import_error("mamba_ssm"):
            print(f"  {impl:10s} not importable ({_import_error('mamba_ssm')})")
            continue
        seconds = timed(lambda: pass_(lambda: selective_scan(*x, impl=impl)), args.device,
                        args.rounds if impl != "reference" else 2)
        print(f"  {impl:10s} {seconds * 1e3:8.2f} ms")
    if args.sweep:
        from diffcraft.nn.scan_triton import TritonScan

        u, delta, A, Bm, Cm, D, z, bias = x
        for block_d in (16, 32, 64, 128):
            for num_warps in (1, 2, 4):
                seconds = timed(lambda: pass_(lambda: TritonScan.apply(u, delta, bias, A, Bm, Cm, D, z, block_d,
                                                                       num_warps)), args.device, args.rounds)
                print(f"  triton block_d {block_d:3d} warps {num_warps}: {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
    main()
