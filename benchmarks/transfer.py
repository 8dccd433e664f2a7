"""Real-time factor of timbre transfer on CPU: 60 s of audio through a default-size model
(separate Mamba encoder, GRU DDSP decoder of width 512), with F0 from the model's encoder and
from CREPE tiny and full. RTF = processing seconds / audio seconds (below 1: faster than real time).

Run: python benchmarks/transfer.py [--seconds 60] [--skip-full]
"""
from __future__ import annotations

import argparse
import time

import torch

from diffcraft.data.synthetic import render_phrase
from diffcraft.models.autoencoder import DiffCraft, ModelConfig
from diffcraft.transfer import timbre_transfer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-full", action="store_true", help="skip CREPE full (~3.6 s per audio second)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiffCraft(ModelConfig(stage="joint")).eval()
    audio = render_phrase(0, args.seconds, sample_rate=16000).audio
    timbre_transfer(model, audio[:16000], "encoder")  # warm-up: kernel compilation
    print(f"{args.seconds:.0f} s of audio, torch threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    for source, crepe in [("encoder", "full"), ("crepe", "tiny")] + ([] if args.skip_full else [("crepe", "full")]):
        start = time.perf_counter()
        timbre_transfer(model, audio, source, crepe_model=crepe)
        seconds = time.perf_counter() - start
        label = "encoder" if source == "encoder" else f"CREPE {crepe}"
        print(f"F0 from {label:11s}: {seconds:6.1f} s  real-time factor {seconds / args.seconds:.3f}")


if __name__ == "__main__":
    main()
