"""Train-step speed of the DDSP decoder with each sequence core, side by side.

For each core (a fresh subprocess each, so peak memory is the core's own): the whole decoder
step at the default size (batch 16 x 4 s, width 512, 100 harmonics, 65 noise bands, 3 s reverb)
with its multi-scale spectral loss and an Adam step; audio-seconds trained per wall-second; peak
memory (RSS on CPU, allocated on CUDA). Then the cores alone (forward + backward at width 512),
timed round-robin in one process, so a machine whose speed drifts slows every core alike.

With `--peer DIR` (a checkout of acids-ircam/ddsp_pytorch), that project's GRU decoder at the same
size (hidden 512, 100 harmonics, 65 bands, 1 s reverb) with its own multi-scale FFT loss is timed the
same way, and each core's speed is given relative to it. On CUDA, TF32 is on as in training
(`train.tf32`; `--no-tf32` turns it off) and the Mamba rows say which scan ran (`--scan` picks one).

Run: python benchmarks/decoders.py [--device cpu|cuda] [--precision fp32|bf16] [--steps 5] [--peer DIR]
     python benchmarks/decoders.py --profile mamba   (where one core's step goes, by operator)
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
import types

import torch

CORES = ("gru", "mamba", "bigru", "bimamba")
BATCH, FRAMES, WIDTH = 16, 400, 512


def setup(device: str, scan: str, tf32: bool) -> None:
    """The process-wide settings a training run makes (`train.loop.configure_device`, `use_scan`)."""
    from diffcraft.nn.scan import use_scan

    use_scan(scan)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True


def peer_model(peer_dir: str, dev: torch.device):
    """acids-ircam/ddsp_pytorch's decoder and loss at this benchmark's size, from a checkout of it.
    Its `ddsp.core` imports librosa and crepe for preprocessing only: where they are missing, empty
    stand-ins let the model import."""
    for name in ("librosa", "crepe"):
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = types.ModuleType(name)
    sys.path.insert(0, peer_dir)
    from ddsp.core import multiscale_fft, safe_log
    from ddsp.model import DDSP

    model = DDSP(hidden_size=WIDTH, n_harmonic=100, n_bands=65, sampling_rate=16000, block_size=160).to(dev)

    def loss_fn(audio, target):  # its train.py: scales 4096 .. 128, overlap 0.75, linear + log distance
        loss = 0
        for s_x, s_y in zip(multiscale_fft(target, [4096, 2048, 1024, 512, 256, 128], 0.75),
                            multiscale_fft(audio, [4096, 2048, 1024, 512, 256, 128], 0.75)):
            loss = loss + (s_x - s_y).abs().mean() + (safe_log(s_x) - safe_log(s_y)).abs().mean()
        return loss

    return model, (lambda f0, loudness: model(f0[..., None], loudness[..., None])[..., 0]), loss_fn


def measure(core: str, device: str, precision: str, steps: int, peer_dir: str | None = None) -> dict:
    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.models.decoder import DDSPDecoder, DecoderConfig
    from diffcraft.nn.scan import announce_scan

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if core == "peer":
        model, forward, loss_fn = peer_model(peer_dir, dev)
    else:
        model = DDSPDecoder(DecoderConfig(core=core)).to(dev)
        forward, loss_fn = (lambda f0, loudness: model(f0, loudness)["audio"]), MultiScaleSpectralLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    f0 = (200 + 200 * torch.rand(BATCH, 1)).expand(BATCH, FRAMES).contiguous().to(dev)
    loudness = (-40 + 20 * torch.rand(BATCH, FRAMES)).to(dev)
    target = (0.1 * torch.randn(BATCH, FRAMES * 160)).to(dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            audio = forward(f0, loudness)
        loss = loss_fn(audio.float(), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed(fn, n):
        times = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    timed(step, 2)  # warm-up: kernel compilation, allocator
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, steps)
    peak_mb = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"core": core, "step_s": step_s, "audio_s_per_s": BATCH * 4.0 / step_s, "peak_mb": peak_mb,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "scan": announce_scan(dev) if "mamba" in core else "-"}


def core_pass(core, x: torch.Tensor, precision: str) -> None:
    """One forward + backward of a core alone."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = core(x)
    y.float().square().mean().backward()


def cores_alone(device: str, precision: str, rounds: int) -> dict[str, float]:
    """Median forward + backward seconds of each core alone, the cores taking turns."""
    from diffcraft.nn import make_core

    torch.manual_seed(0)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    x = torch.randn(BATCH, FRAMES, WIDTH, device=dev)
    cores = {name: make_core(name, WIDTH, WIDTH).to(dev) for name in CORES}

    times = {name: [] for name in CORES}
    for round_ in range(rounds + 2):  # two warm-up rounds
        for name, core in cores.items():
            sync()
            start = time.perf_counter()
            core_pass(core, x, precision)
            sync()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def profile_core(name: str, device: str, precision: str, steps: int) -> None:
    """torch.profiler's table of one core's forward + backward, per step, by operator."""
    from torch.profiler import profile

    from diffcraft.nn import make_core

    torch.manual_seed(0)
    dev = torch.device(device)
    core = make_core(name, WIDTH, WIDTH).to(dev)
    x = torch.randn(BATCH, FRAMES, WIDTH, device=dev)
    core_pass(core, x, precision), core_pass(core, x, precision)
    with profile() as prof:
        for _ in range(steps):
            core_pass(core, x, precision)
    print(f"{name}, {precision}: self time per step by operator (ms), {steps} steps")
    for event in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total
                        if dev.type == "cuda" else -e.self_cpu_time_total)[:12]:
        total = event.self_device_time_total if dev.type == "cuda" else event.self_cpu_time_total
        print(f"  {event.key:40s} {total / steps / 1e3:8.1f}")


def main() -> None:
    from diffcraft.nn.scan import SCANS

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--scan", default="auto", choices=SCANS, help="Mamba's scan (default: by device)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="CUDA: exact fp32 matrix products")
    parser.add_argument("--peer", metavar="DIR", help="a checkout of acids-ircam/ddsp_pytorch to time beside")
    parser.add_argument("--profile", choices=CORES, help="profile this core alone instead")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup(args.device, args.scan, args.tf32)
    if args.profile:
        profile_core(args.profile, args.device, args.precision, args.steps)
        return
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.precision, args.steps, args.peer)))
        return
    name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"device {args.device} ({name}), precision {args.precision}, tf32 {args.tf32}, batch {BATCH} x 4 s, "
          f"width {WIDTH}, torch threads {torch.get_num_threads()}, median of {args.steps} steps")
    print(f"{'core':8s} {'params M':>8s} {'step s':>8s} {'audio-s/s':>10s} {'peak MB':>8s} {'core fwd+bwd s':>15s}"
          f" {'scan':>9s}" + (f" {'x peer':>7s}" if args.peer else ""))
    rows = []
    for core in CORES + (("peer",) if args.peer else ()):
        out = subprocess.run([sys.executable, __file__, "--one", core, "--device", args.device,
                              "--precision", args.precision, "--steps", str(args.steps), "--scan", args.scan]
                             + ([] if args.tf32 else ["--no-tf32"]) + (["--peer", args.peer] if args.peer else []),
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{core}: the measurement failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    core_s = cores_alone(args.device, args.precision, 2 * args.steps)
    peer_s = rows[-1]["step_s"] if args.peer else None
    for r in rows:
        print(f"{r['core']:8s} {r['params_m']:8.2f} {r['step_s']:8.3f} {r['audio_s_per_s']:10.1f} "
              f"{r['peak_mb']:8.0f} {core_s.get(r['core'], float('nan')):15.3f} {r['scan']:>9s}"
              + (f" {peer_s / r['step_s']:7.2f}" if peer_s else ""))
    print(f"core alone, mamba / gru: {core_s['mamba'] / core_s['gru']:.2f}; "
          f"bimamba / bigru: {core_s['bimamba'] / core_s['bigru']:.2f} "
          f"(median of {2 * args.steps} rounds, cores in turn)")


if __name__ == "__main__":
    main()
