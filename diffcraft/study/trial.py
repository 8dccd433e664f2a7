"""One Ray Tune trial: a Tune function trainable that opens the trial's MLflow run and trains it
as a Ray Train `TorchTrainer` of `resources.workers` workers (`study.worker.train_worker`),
and the Tune callback that ends the run when the trial ends, with its artifacts.

The Train run is named after the trial and lives in the study's storage (`<study>/train/<trial>`),
so a trial restarted on any node, or by a resumed study, continues from its last committed epoch.
Retries happen at one level only, Tune's (`max_retries`): Ray Train itself does not retry, so a
failure costs one retry, not one per level.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from diffcraft.storage import Location, filesystem
from diffcraft.study.schema import StudyConfig, config_hash, trial_config, trial_label
from diffcraft.study.tracking import TrialRun, code_version
from diffcraft.study.worker import METRICS_FILE, STATE_FILE, train_worker
from diffcraft.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

N_AUDIO_SAMPLES = 2  # validation clips whose ground truth and synthesis are logged as wav
TRIAL_DRIVER_MEMORY = 64 << 20  # what a trial's own process reserves: its workers hold the CPUs and GPUs


def train_location(study: StudyConfig) -> Location:
    return study.location / "train"


def trial_main(params: dict, study: StudyConfig, state: dict) -> None:
    """The Tune function trainable (see the module docstring)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = trial_config(study, params)
    cfg.name = trial_id
    tags = {"study": study.name, "trial_name": trial_name, "seed": cfg.train.seed,
            "config_hash": config_hash(params), "config_group": config_hash(params, without_seed=True),
            "code_version": code_version(), "workers": study.resources.workers}
    run = TrialRun.open(state["tracking_uri"], state["experiment_id"], state["parent_run_id"], trial_id, tags,
                        asdict(cfg), run_name=trial_label(params))  # named by what varies; Tune's name is a tag
    fs, root = filesystem(train_location(study).uri)
    r = study.resources
    _pin_cluster_address()
    try:
        TorchTrainer(
            train_worker,
            train_loop_config={"study": study, "cfg": cfg, "run_id": run.run_id, "tracking_uri": state["tracking_uri"]},
            scaling_config=ray.train.ScalingConfig(
                num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=trial_id, storage_path=root, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=study.objective.metric,
                    checkpoint_score_order=study.objective.mode),  # the best by the objective, and the latest
                failure_config=ray.train.FailureConfig(max_failures=0, controller_failure_limit=3),
                callbacks=[TuneReportCallback()]),
        ).fit()
    except Exception as err:
        run.tag(error=f"{type(err).__name__}: {err}"[:5000])
        run.client.log_text(run.run_id, traceback.format_exc(), "error.txt")
        raise


def _pin_cluster_address() -> None:
    """Ray Train's placement-group cleaner asks the State API whether the Train controller lives;
    without an address that API looks for Ray on the machine and gives up when it finds several
    instances (two clusters, or a local Ray beside a cluster node), and the placement group of a
    trial stopped early then leaks. RAY_ADDRESS, passed on to the controller, names ours."""
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")


def best_checkpoint(study: StudyConfig, trial_id: str) -> tuple[Location, dict] | None:
    """The trial's kept checkpoint that is best by the objective: (folder, its reported metrics)."""
    folder = train_location(study) / trial_id
    found = []
    for rel in folder.list_info():
        if rel.endswith("/" + METRICS_FILE):
            name = rel.rsplit("/", 1)[0]
            metrics = json.loads((folder / rel).read_text() or "{}")
            if study.objective.metric in metrics and (folder / name / STATE_FILE).exists():
                found.append((folder / name, metrics))
    if not found:
        return None
    sign = 1 if study.objective.mode == "min" else -1
    return min(found, key=lambda item: sign * item[1][study.objective.metric])


def log_trial_artifacts(run: TrialRun, study: StudyConfig, trial_id: str) -> dict | None:
    """Log the trial's best checkpoint (as checkpoint/best.pt: weights, config and history, no
    optimizer), its config, loss curves, and for a model with a decoder a spectrogram with the F0
    contour and wav files of ground truth and synthesis; returns the best epoch's metrics."""
    from diffcraft.audio.io import write_wav
    from diffcraft.data.dataset import ClipDataset
    from diffcraft.errors import DataError
    from diffcraft.figures import latent_figures
    from diffcraft.plots import loss_curve_figure, spectrogram_figure
    from diffcraft.train.evaluate import seeded

    found = best_checkpoint(study, trial_id)
    if found is None:
        return None
    folder, metrics = found
    best_epoch = int(metrics["epochs_done"]) - 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = load_checkpoint((folder / STATE_FILE).download(tmp / STATE_FILE))
        state.pop("optimizer", None)
        best = save_checkpoint(tmp / "checkpoint" / "best.pt", state)
        run.log_artifact(best, "checkpoint")
        run.log_dict(state["config"], "config.yaml")
        history = state["history"]
        run.log_artifact(loss_curve_figure(tmp / "loss_curves.png", history, [
            k for k in ("train_loss", "val_loss", "val_mss_mean", "val_rpa", "val_loudness_mae_db", "val_kl",
                        "val_active_units") if k in history[-1]]), "figures")
        model, cfg = model_from_checkpoint(best)
        run.log_metrics(describe_cost(model, history), best_epoch)
        log_clip_scores(run, model, cfg, tmp, best_epoch)
        clips = ClipDataset(cfg.data.cache, "validation")
        try:  # the latent maps of a model with an encoder (none for the decoder stage)
            for path in latent_figures(model, clips, tmp / "latent"):
                run.log_artifact(path, "figures")
        except DataError as err:  # e.g. a validation split of one clip: the trial keeps its other artifacts
            run.tag(latent_figures_skipped=str(err)[:5000])
        if model.decoder is not None:
            with torch.no_grad(), seeded(0):
                for i in range(min(N_AUDIO_SAMPLES, len(clips))):
                    clip = clips[i]
                    out = model(clip["audio"][None], clip["f0_hz"][None], clip["loudness_db"][None])
                    synth = out["synth"]["audio"][0].numpy()
                    f0 = out.get("f0_hz", clip["f0_hz"][None])[0]
                    run.log_artifact(spectrogram_figure(tmp / f"spectrogram_{i}.png", clip["audio"], synth, f0,
                                                        f"validation clip {i}"), "figures")
                    run.log_artifact(write_wav(tmp / f"clip{i}_truth.wav", clip["audio"].numpy()), "audio")
                    run.log_artifact(write_wav(tmp / f"clip{i}_synth.wav", synth, limit_peak=True), "audio")
    run.tag(best_epoch=best_epoch,
            **{f"best_{study.objective.metric}": metrics.get(study.objective.metric, math.nan)})
    return metrics


def describe_cost(model: torch.nn.Module, history: list[dict]) -> dict:
    """What a configuration costs: its parameters (in all and per top-level module) and the
    mean training seconds per epoch, so an ablation's report can say what it compared."""
    from diffcraft.models.sizing import count_parameters

    out = {"n_parameters": count_parameters(model)}
    for name, module in model.named_children():
        out[f"n_parameters_{name}"] = count_parameters(module)
    seconds = [m["epoch_seconds"] for m in history if "epoch_seconds" in m]
    if seconds:
        out["seconds_per_epoch"] = sum(seconds) / len(seconds)
    return out


def log_clip_scores(run: TrialRun, model, cfg, tmp: Path, step: int) -> None:
    """Score every validation and test clip at the selected checkpoint: one CSV per split
    (`evaluation/clips_<split>.csv`, for paired comparisons between runs) and the test split's
    summaries as `test_*` metrics, the numbers a report cites."""
    from diffcraft.data.dataset import split_sizes
    from diffcraft.train.evaluate import score_split, summarize
    from diffcraft.train.metrics import write_clip_table

    sizes = split_sizes(cfg.data.cache)
    for split in ("validation", "test"):
        if not sizes.get(split):
            continue
        names, scores = score_split(model, cfg.data.cache, split, cfg.data.batch_size)
        run.log_artifact(write_clip_table(tmp / f"clips_{split}.csv", names, scores), "evaluation")
        if split == "test":
            run.log_metrics(summarize(scores, "test_"), step)


def end_trial_run(study: StudyConfig, state: dict, trial, failed: bool = False) -> str:
    """End a trial's MLflow run as its Tune trial ends: FINISHED when it trained every epoch (or
    the collapse guard stopped it), KILLED with the reason when the scheduler stopped it early,
    FAILED with the error. Artifacts are logged first in every case that has a checkpoint, so a
    trial stopped early can still be promoted. Returns the status."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    found = client.search_runs([state["experiment_id"]], f"tags.trial_id = '{trial.trial_id}'", max_results=1)
    if not found:
        return "MISSING"
    run = TrialRun(client, found[0].info.run_id)
    last = trial.last_result or {}
    if not failed:
        try:
            log_trial_artifacts(run, study, trial.trial_id)
        except Exception as err:  # noqa: BLE001 - the run still ends; the tag says what is missing
            run.tag(artifacts_error=f"{type(err).__name__}: {err}"[:5000])
    decided_on = int(last.get("epochs_done", 0))  # the result Tune ended the trial on
    # the worker does not wait for Tune's verdict: it may have trained and logged on meanwhile
    done = max(decided_on, len(run.logged_epochs()))
    epochs = study.run.train.epochs
    guard_stopped = bool(last.get("collapsed")) and study.collapse_guard.action == "stop" and done < epochs
    if failed:
        status = "FAILED"
        run.tag(ended_by="error", **({} if "error" in found[0].data.tags else
                                    {"error": "the trial's process died (its node was lost or it was killed)"}))
    elif done < epochs and not guard_stopped:
        status = "KILLED"
        run.tag(ended_by="scheduler", stopped_reason=f"stopped by the {study.scheduler.kind} scheduler on its "
                                                     f"result of epoch {decided_on} of {epochs}")
    else:
        status = "FINISHED"
        if guard_stopped:
            run.tag(ended_by="collapse_guard")
    run.end(status)
    return status


def trial_run_callback(study: StudyConfig, state: dict):
    """The Tune callback that ends each trial's MLflow run when the trial ends."""
    from ray.tune import Callback

    class EndTrialRuns(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            end_trial_run(study, state, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            end_trial_run(study, state, trial, failed=True)

    return EndTrialRuns()
