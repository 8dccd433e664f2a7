"""Training throughput of a whole run: the training loop, its data loader and its device copies,
as `diffcraft train` runs them, in audio-seconds trained per wall-second (the epoch's
`audio_seconds_per_second`: training steps only, validation excluded).

The default model is the joint VAE at the default sizes (Mamba encoders of width 256, a BiMamba
decoder of width 512), batch 16, drawing `--clips` clips per epoch with replacement from a prepared
cache. The first epoch carries the warm-up (kernel compilation, cuDNN's autotuner), so the figure is
the median of the later ones.

Run: python benchmarks/train_speed.py --cache CACHE [--device cuda] [--precision bf16] [--epochs 4]
         [--clips 640] [--set model.decoder.core=mamba ...]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch

JOINT_VAE = ["model.stage=joint", "model.encoder.latent=vae", "model.encoder.core=mamba", "model.encoder.width=256",
             "model.decoder.core=bimamba", "model.decoder.width=512", "data.batch_size=16"]


def main() -> None:
    from diffcraft.train.config import load_run_config
    from diffcraft.train.loop import train

    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True, help="a feature cache made by `diffcraft data prepare`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--clips", type=int, default=640, help="training clips per epoch")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the run config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(None, JOINT_VAE + [
            f"data.cache={args.cache}", f"data.clips_per_epoch={args.clips}", "data.validation_clips=16",
            f"train.epochs={args.epochs}", f"train.device={args.device}", f"train.precision={args.precision}",
            f"out_dir={out}", *args.set])
        result = train(cfg, progress=False)
    speeds = [m["audio_seconds_per_second"] for m in result.history]
    name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(f"{args.device} ({name}), {args.precision}, scan {result.scan}, stage {cfg.model.stage} "
          f"({cfg.model.encoder.latent}), encoder {cfg.model.encoder.core} {cfg.model.encoder.width}, decoder "
          f"{cfg.model.decoder.core} {cfg.model.decoder.width}, batch {cfg.data.batch_size}, {args.clips} clips/epoch")
    print("audio-s/s per epoch: " + ", ".join(f"{s:.0f}" for s in speeds))
    print(f"median after the first epoch: {statistics.median(speeds[1:] or speeds):.0f} audio-s/s")


if __name__ == "__main__":
    main()
