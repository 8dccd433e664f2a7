"""What runs inside one Ray Tune trial: the training loop of `diffcraft.train`, with per-epoch
reports to Tune and MLflow, the collapse guard, and the trial's artifacts at the end."""
from __future__ import annotations

import math
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from diffcraft.study.schema import StudyConfig, config_hash, run_config
from diffcraft.study.tracking import TrialRun, code_version, scalar_metrics
from diffcraft.train.checkpoint import load_checkpoint

N_AUDIO_SAMPLES = 2  # validation clips whose ground truth and synthesis are logged as wav


class CollapseGuard:
    """Counts epochs in a row whose active units stay below the floor."""

    def __init__(self, cfg):
        self.cfg, self.low_epochs = cfg, 0

    def update(self, metrics: dict) -> bool:
        """True once the floor has been missed `patience` epochs in a row."""
        if not self.cfg.min_active_units or "val_active_units" not in metrics:
            return False
        low = metrics["val_active_units"] < self.cfg.min_active_units
        self.low_epochs = self.low_epochs + 1 if low else 0
        return self.low_epochs >= self.cfg.patience


def _previous_run_id(out_dir: Path) -> str | None:
    last = out_dir / "checkpoints" / "last.pt"
    if last.is_file():
        return load_checkpoint(last).get("extra", {}).get("mlflow_run_id")
    return None


def log_trial_artifacts(run: TrialRun, out_dir: Path, cfg) -> None:
    """Best checkpoint, its config, loss curves, and for a model with a decoder a spectrogram
    with the F0 contour and wav files of ground truth and synthesis for a few validation clips."""
    from diffcraft.audio.io import write_wav
    from diffcraft.data.dataset import ClipDataset
    from diffcraft.plots import loss_curve_figure, spectrogram_figure
    from diffcraft.transfer import model_from_checkpoint

    best = out_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        return
    run.log_artifact(best, "checkpoint")
    run.log_dict(asdict(cfg), "config.yaml")
    history = load_checkpoint(best)["history"]
    figures = out_dir / "figures"
    run.log_artifact(loss_curve_figure(figures / "loss_curves.png", history, [
        k for k in ("train_loss", "val_loss", "val_mss_mean", "val_rpa", "val_loudness_mae_db", "val_kl",
                    "val_active_units") if k in history[-1]]), "figures")
    model, _ = model_from_checkpoint(best)
    if model.decoder is None:
        return
    clips = ClipDataset(cfg.data.cache, "validation")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for i in range(min(N_AUDIO_SAMPLES, len(clips))):
            clip = clips[i]
            out = model(clip["audio"][None], clip["f0_hz"][None], clip["loudness_db"][None])
            synth = out["synth"]["audio"][0].numpy()
            f0 = out.get("f0_hz", clip["f0_hz"][None])[0]
            run.log_artifact(spectrogram_figure(figures / f"spectrogram_{i}.png", clip["audio"], synth, f0,
                                                f"validation clip {i}"), "figures")
            run.log_artifact(write_wav(out_dir / "audio" / f"clip{i}_truth.wav", clip["audio"].numpy()), "audio")
            run.log_artifact(write_wav(out_dir / "audio" / f"clip{i}_synth.wav",
                                       synth / max(1.0, float(np.abs(synth).max()))), "audio")


def trial_main(params: dict, study: StudyConfig, experiment_id: str, parent_run_id: str,
               tracking_uri: str) -> None:
    """The Tune function trainable."""
    from ray import tune

    from diffcraft.train.loop import train

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = run_config(study.base_run(), params)
    cfg.name = trial_id
    out_dir = study.directory / "trials" / trial_id
    tags = {"study": study.name, "trial_name": trial_name, "seed": cfg.train.seed,
            "config_hash": config_hash(params), "config_group": config_hash(params, without_seed=True),
            "code_version": code_version()}
    run = TrialRun.open(tracking_uri, experiment_id, parent_run_id, trial_id, tags, asdict(cfg),
                        _previous_run_id(out_dir))
    guard = CollapseGuard(study.collapse_guard)
    objective = study.objective
    reported = []

    def on_epoch(metrics: dict, checkpoint: Path) -> bool:
        run.log_epoch(metrics)
        collapsed = guard.update(metrics)
        report = scalar_metrics(metrics)
        if objective.metric not in report:
            raise KeyError(f"objective.metric {objective.metric!r} is not among this trial's metrics: "
                           f"{sorted(k for k in report if k.startswith(('val_', 'train_')))}")
        if collapsed:
            run.tag(collapsed="true")
            if study.collapse_guard.action == "penalize":
                sign = 1 if objective.mode == "min" else -1
                report[objective.metric] += sign * study.collapse_guard.penalty
        tune.report(report)
        reported.append(metrics["epoch"])
        return collapsed and study.collapse_guard.action == "stop"

    try:
        result = train(cfg, out_dir, progress=False, on_epoch=on_epoch, extra_state={"mlflow_run_id": run.run_id})
        if not reported and result.history:  # restarted after its last epoch: tell Tune the result
            tune.report(scalar_metrics(result.history[-1]))
        best = result.best.get(objective.metric, math.nan)
        run.tag(best_epoch=result.best.get("epoch"), **{f"best_{objective.metric}": best})
        log_trial_artifacts(run, out_dir, cfg)
        run.end("FINISHED")
    except Exception as err:
        run.tag(error=f"{type(err).__name__}: {err}"[:5000])
        run.client.log_text(run.run_id, traceback.format_exc(), "error.txt")
        run.end("FAILED")
        raise
