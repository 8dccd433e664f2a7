"""Study orchestration overhead: N trials through the study engine (Ray Tune, a Ray Train
TorchTrainer per trial, MLflow logging, artifacts) against the same N trainings run back to back in
one process; the difference, less one Ray start and stop, divided by N is the fixed cost per trial.

Run: python benchmarks/study_overhead.py [--trials 4] [--epochs 2] [--concurrency 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from diffcraft.data.prepare import prepare
from diffcraft.data.synthetic import write_dataset
from diffcraft.study.runner import run_study
from diffcraft.study.studyfile import load_study
from diffcraft.raytools import ray_session
from diffcraft.train.loop import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diffcraft-overhead-"))
    write_dataset(work / "src", n_songs=3, stems_per_song=1, seconds=12.0, seed=1)
    prepare(work / "src", work / "cache", progress=False, num_cpus=2)
    study_file = work / "study.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "overhead", "storage": str(work / "studies"), "concurrency": args.concurrency,
        "mlflow": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        "run": {"data": {"cache": str(work / "cache"), "batch_size": 4, "clips_per_epoch": 8},
                "model": {"decoder": {"width": 64, "n_harmonics": 40, "reverb_seconds": 0.5}},
                "train": {"epochs": args.epochs, "lr": 1e-3}},
        "search": {"algorithm": "grid", "space": {"train.seed": {"grid": list(range(args.trials))}}},
        "objective": {"metric": "val_mss_mean", "mode": "min"}}))
    study = load_study(study_file)

    start = time.perf_counter()
    for seed in range(args.trials):
        cfg = study.trial_config({"train.seed": seed})
        train(cfg, work / "direct" / str(seed), progress=False)
    direct = time.perf_counter() - start

    start = time.perf_counter()
    with ray_session(None, logging_level="ERROR"):
        pass
    ray_start = time.perf_counter() - start

    start = time.perf_counter()
    run_study(study, verbose=0)
    engine = time.perf_counter() - start
    per_trial = (engine - direct - ray_start) * args.concurrency / args.trials
    print(f"{args.trials} trials x {args.epochs} epochs (tiny decoder), concurrency {args.concurrency}")
    print(f"back to back in one process: {direct:7.1f} s")
    print(f"through the study engine:    {engine:7.1f} s  (Ray start, Tune, Ray Train, MLflow runs, figures, audio, checkpoints)")
    print(f"a local Ray start and stop:  {ray_start:7.1f} s")
    print(f"fixed cost per trial:        {per_trial:7.1f} s  ((engine - direct - Ray start) x concurrency / trials)")
    print(f"ratio engine / direct:       {engine / direct:7.2f}")


if __name__ == "__main__":
    main()
