"""Study orchestration overhead: N trials through the study engine (Ray Tune, a Ray Train
TorchTrainer per trial, MLflow logging, artifacts) against the same N trainings run back to back in
one process; the difference, less one Ray start and stop, divided by N is the fixed cost per trial.
With --profile, where a trial's time goes (the median over trials of each phase, from the marks of
`diffcraft.study.timeline`).

Run: python benchmarks/study_overhead.py [--trials 4] [--epochs 2] [--concurrency 1] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from diffcraft.data.prepare import prepare
from diffcraft.data.synthetic import write_dataset
from diffcraft.raytools import ray_session
from diffcraft.study import timeline
from diffcraft.study.runner import run_study
from diffcraft.study.studyfile import load_study
from diffcraft.train.loop import train

# (phase, from mark, to mark): consecutive marks of one trial; an epoch's marks repeat per epoch
PHASES = [
    ("Tune: the previous trial's end to this trial's actor", "previous_run_ended", "trial_start"),
    ("trial process: until trial_main runs", "trial_start", "trial_main"),
    ("MLflow: trial run opened", "trial_main", "run_opened"),
    ("Train: controller, placement group, worker actor", "run_opened", "worker_process"),
    ("Train worker: imports, process group, until train_worker", "worker_process", "worker_main"),
    ("worker: model, data loaders, restore", "worker_main", "run_ready"),
    ("worker: epochs' training and validation", "run_ready", "epoch_trained"),
    ("worker: checkpoint written and ray.train.report", "epoch_trained", "reported"),
    ("worker: waiting for the checkpoint's commit", "reported", "committed"),
    ("worker: MLflow epoch log", "committed", "logged"),
    ("worker: after its last epoch (end-of-trial work)", "logged", "train_end"),
    ("Train: shutdown, until fit() returns", "train_end", "fit_end"),
    ("Tune: trial result seen by the driver", "fit_end", "trial_complete"),
    ("driver: end_trial_run (callback in Tune's loop)", "trial_complete", "run_ended"),
]


def phase_seconds(marks: list[dict]) -> dict[str, float]:
    """One trial's seconds per phase; a phase that repeats (each epoch) is summed, the time
    between an epoch's log and the next epoch's training counted as training."""
    marks = sorted(marks, key=lambda m: m["t"])
    out = {name: 0.0 for name, _, _ in PHASES}
    last = {}
    for m in marks:
        for name, start, end in PHASES:
            if m["event"] == end and start in last:
                out[name] += m["t"] - last[start]
        last[m["event"]] = m["t"]
        if m["event"] == "logged":  # the next epoch trains from here
            last["run_ready"] = m["t"]
    return out


def print_profile(path: Path, direct_per_trial: float) -> None:
    by_trial: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        mark = json.loads(line)
        by_trial.setdefault(mark["trial"], []).append(mark)
    trials = sorted(by_trial.values(), key=lambda marks: min(m["t"] for m in marks))
    for before, marks in zip(trials, trials[1:]):  # the gap in Tune's loop between two trials
        ended = [m["t"] for m in before if m["event"] == "run_ended"]
        marks.extend({"t": t, "event": "previous_run_ended"} for t in ended)
    per_trial = [phase_seconds(marks) for marks in trials]
    spans = [max(m["t"] for m in marks) - min(m["t"] for m in marks) for marks in trials]
    print(f"\nwhere a trial's time goes (median over {len(per_trial)} trials, seconds; the first trial has no "
          "previous one):")
    for name, _, _ in PHASES:
        print(f"  {name:<60} {statistics.median(p[name] for p in per_trial):6.2f}")
    print(f"  {'a trial, first mark to last':<60} {statistics.median(spans):6.2f}")
    training = "worker: epochs' training and validation"
    fixed = [span - p[training] for span, p in zip(spans, per_trial)]
    print(f"  {'fixed cost: a trial less its training and validation':<60} {statistics.median(fixed):6.2f}")
    print(f"  {'the same training back to back in one process':<60} {direct_per_trial:6.2f}")
    memory = [m for marks in trials for m in marks if m["event"] == "fit_end" and "rss" in m]
    if not memory:  # no trial ended its fit
        return
    print(f"a trial's own process (TRIAL_DRIVER_MEMORY) at its end: {max(m['rss'] for m in memory) >> 20} MiB "
          f"resident, {max(m['uss'] for m in memory) >> 20} MiB its own (largest of {len(memory)})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print where a trial's time goes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diffcraft-overhead-"))
    if args.profile:  # set before Ray starts: every Ray process inherits it
        os.environ[timeline.ENV] = str(work / "timeline.jsonl")
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
    if args.profile:
        print_profile(work / "timeline.jsonl", direct / args.trials)


if __name__ == "__main__":
    main()
