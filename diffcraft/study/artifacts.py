"""What a trial leaves in its MLflow run when it ends: its best checkpoint (by the objective) with
its config, loss curves, the latent figures, spectrograms and audio of a few validation clips, the
cost of its configuration, and every validation and test clip scored at that checkpoint.

Logged where the trial trained, never in Tune's driver: by the trial's rank-0 worker after its last
epoch, or for a trial the scheduler stopped (its workers are gone) by a Ray task that
`study.outcome` starts on a node with CPUs. The run's `artifacts` tag says they are there.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from diffcraft.study.config import StudyConfig
from diffcraft.study.tracking import TrialRun
from diffcraft.study.checkpoints import STATE_FILE, best_checkpoint
from diffcraft.train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from diffcraft.train.names import (EPOCH_SECONDS, EPOCHS_DONE, KL, LOUDNESS_MAE_DB, MSS, N_PARAMETERS, RPA,
                                   SECONDS_PER_EPOCH, TEST, TRAIN_LOSS, VAL, VAL_ACTIVE_UNITS, VAL_LOSS, mean_name)

N_AUDIO_SAMPLES = 2  # validation clips whose ground truth and synthesis are logged as wav
ARTIFACTS_TAG = "artifacts"  # "logged" once a run has them: nothing logs them twice
LOSS_CURVES = (TRAIN_LOSS, VAL_LOSS, mean_name(MSS, VAL), VAL + RPA, VAL + LOUDNESS_MAE_DB, VAL + KL,
               VAL_ACTIVE_UNITS)  # drawn in figures/loss_curves.png, those a trial reports


def has_artifacts(tags: dict) -> bool:
    """Whether a run with these tags has its end-of-trial artifacts."""
    return tags.get(ARTIFACTS_TAG) == "logged"


def log_artifacts_once(run: TrialRun, study: StudyConfig, trial_id: str) -> None:
    """`log_trial_artifacts` unless the run has them; an error is tagged on the run, not raised (the
    run still ends, the tag says what is missing)."""
    if has_artifacts(run.client.get_run(run.run_id).data.tags):
        return
    try:
        log_trial_artifacts(run, study, trial_id)
    except Exception as err:  # noqa: BLE001
        run.tag(artifacts_error=f"{type(err).__name__}: {err}"[:5000])


def log_trial_artifacts(run: TrialRun, study: StudyConfig, trial_id: str) -> dict | None:
    """Log the trial's best checkpoint (as checkpoint/best.pt: weights, config and history, no
    optimizer), its config, loss curves, and for a model with a decoder a spectrogram with the F0
    contour and wav files of ground truth and synthesis; returns the best epoch's metrics."""
    from diffcraft.plots import loss_curve_figure

    found = best_checkpoint(study, trial_id)
    if found is None:
        return None
    folder, metrics = found
    best_epoch = int(metrics[EPOCHS_DONE]) - 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        saved = load_checkpoint((folder / STATE_FILE).download(tmp / STATE_FILE))
        saved.pop("optimizer", None)
        best = save_checkpoint(tmp / "checkpoint" / "best.pt", saved)
        run.log_artifact(best, "checkpoint")
        run.log_dict(saved["config"], "config.yaml")
        history = saved["history"]
        run.log_artifact(loss_curve_figure(tmp / "loss_curves.png", history,
                                           [k for k in LOSS_CURVES if k in history[-1]]), "figures")
        model, cfg = model_from_checkpoint(best)
        run.log_metrics(describe_cost(model, history), best_epoch)
        log_clip_scores(run, model, cfg, tmp, best_epoch)
        log_clip_figures(run, model, cfg, tmp)
    run.tag(best_epoch=best_epoch, **{ARTIFACTS_TAG: "logged"},
            **{f"best_{study.objective.metric}": metrics.get(study.objective.metric, math.nan)})
    return metrics


def log_clip_figures(run: TrialRun, model, cfg, tmp: Path) -> None:
    """The latent maps of a model with an encoder, and for a model with a decoder the
    spectrograms with the F0 used and the wav files of the first validation clips."""
    from diffcraft.audio.io import write_wav
    from diffcraft.data.dataset import ClipDataset
    from diffcraft.errors import DataError
    from diffcraft.figures import latent_figures
    from diffcraft.plots import spectrogram_figure
    from diffcraft.train.evaluate import seeded

    clips = ClipDataset(cfg.data.cache, "validation")
    try:  # none for the decoder stage
        for path in latent_figures(model, clips, tmp / "latent"):
            run.log_artifact(path, "figures")
    except DataError as err:  # e.g. a validation split of one clip: the trial keeps its other artifacts
        run.tag(latent_figures_skipped=str(err)[:5000])
    if model.decoder is None:
        return
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


def describe_cost(model: torch.nn.Module, history: list[dict]) -> dict:
    """What a configuration costs: its parameters (in all and per top-level module) and the
    mean training seconds per epoch, so an ablation's report can say what it compared."""
    from diffcraft.models.sizing import count_parameters

    out = {N_PARAMETERS: count_parameters(model)}
    for name, module in model.named_children():
        out[f"{N_PARAMETERS}_{name}"] = count_parameters(module)
    seconds = [m[EPOCH_SECONDS] for m in history if EPOCH_SECONDS in m]
    if seconds:
        out[SECONDS_PER_EPOCH] = sum(seconds) / len(seconds)
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
            run.log_metrics(summarize(scores, TEST), step)
