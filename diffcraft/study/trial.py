"""What runs inside one Ray Tune trial: the training loop of `diffcraft.train`, with per-epoch
reports to Tune and MLflow, the collapse guard, and the trial's artifacts at the end."""
from __future__ import annotations

import math
import traceback
from dataclasses import asdict
from pathlib import Path

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
            run.log_artifact(write_wav(out_dir / "audio" / f"clip{i}_synth.wav", synth, limit_peak=True), "audio")


def epoch_reporter(study: StudyConfig, run: TrialRun | None, report_fn):
    """The `on_epoch` callback of a trial: MLflow (when this process holds the run), the collapse
    guard, and a report to Tune or Ray Train through `report_fn`. Returns (callback, reported)."""
    guard = CollapseGuard(study.collapse_guard)
    objective = study.objective
    reported: list[int] = []

    def on_epoch(metrics: dict, checkpoint: Path) -> bool:
        if run is None:  # a Ray Train worker of rank > 0: join the report, nothing to log
            report_fn({})
            return False
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
        report_fn(report)
        reported.append(metrics["epoch"])
        return collapsed and study.collapse_guard.action == "stop"

    return on_epoch, reported


def train_worker(config: dict) -> None:
    """One Ray Train worker of a multi-worker trial (DDP over gloo on CPU, NCCL on GPU)."""
    import ray.train
    from mlflow.tracking import MlflowClient

    from diffcraft.train.loop import train

    study, cfg, out_dir = config["study"], config["cfg"], Path(config["out_dir"])
    rank = ray.train.get_context().get_world_rank()
    run = TrialRun(MlflowClient(config["tracking_uri"]), config["run_id"]) if rank == 0 else None
    on_epoch, _ = epoch_reporter(study, run, ray.train.report)
    train(cfg, out_dir, progress=False, on_epoch=on_epoch, extra_state={"mlflow_run_id": config["run_id"]})


def _train_with_workers(study: StudyConfig, cfg, out_dir: Path, run: TrialRun, trial_id: str,
                        tracking_uri: str) -> None:
    """The trial as the driver of a Ray Train TorchTrainer with `resources.workers` workers."""
    import os

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # the 2 s default adds seconds per report
    r = study.resources
    TorchTrainer(
        train_worker,
        train_loop_config={"study": study, "cfg": cfg, "out_dir": str(out_dir), "run_id": run.run_id,
                           "tracking_uri": tracking_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=str(study.directory / "train"),
            failure_config=ray.train.FailureConfig(max_failures=study.max_retries, controller_failure_limit=3),
            callbacks=[TuneReportCallback()]),
    ).fit()


def trial_main(params: dict, study: StudyConfig, experiment_id: str, parent_run_id: str,
               tracking_uri: str) -> None:
    """The Tune function trainable: trains in this process (one worker) or drives a Ray Train
    TorchTrainer (several workers); either way this process owns the trial's MLflow run."""
    from ray import tune

    from diffcraft.train.loop import train

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = run_config(study.base_run(), params)
    cfg.name = trial_id
    out_dir = study.directory / "trials" / trial_id
    tags = {"study": study.name, "trial_name": trial_name, "seed": cfg.train.seed,
            "config_hash": config_hash(params), "config_group": config_hash(params, without_seed=True),
            "code_version": code_version(), "workers": study.resources.workers}
    run = TrialRun.open(tracking_uri, experiment_id, parent_run_id, trial_id, tags, asdict(cfg),
                        _previous_run_id(out_dir))
    objective = study.objective
    try:
        if study.resources.workers > 1:
            _train_with_workers(study, cfg, out_dir, run, trial_id, tracking_uri)
            state = load_checkpoint(out_dir / "checkpoints" / "last.pt")
            best = state["best"]
        else:
            on_epoch, reported = epoch_reporter(study, run, tune.report)
            result = train(cfg, out_dir, progress=False, on_epoch=on_epoch,
                           extra_state={"mlflow_run_id": run.run_id})
            if not reported and result.history:  # restarted after its last epoch: tell Tune the result
                tune.report(scalar_metrics(result.history[-1]))
            best = result.best
        run.tag(best_epoch=best.get("epoch"), **{f"best_{objective.metric}": best.get(objective.metric, math.nan)})
        log_trial_artifacts(run, out_dir, cfg)
        run.end("FINISHED")
    except Exception as err:
        run.tag(error=f"{type(err).__name__}: {err}"[:5000])
        run.client.log_text(run.run_id, traceback.format_exc(), "error.txt")
        run.end("FAILED")
        raise
