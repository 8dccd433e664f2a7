"""What a run config's stage reports each epoch, which config fields it reads, and which sizes a
training clip can hold: declared next to the loop that produces them (the names themselves are
`train.names`), so a study can be checked before anything trains. `tests/test_review.py` trains
one epoch of every stage and compares the keys it reports with `epoch_metric_names`, so the
declaration cannot drift from the loop.
"""
from __future__ import annotations

from diffcraft import CLIP_SAMPLES, CLIP_SECONDS
from diffcraft.models.encoders import LATENT_HEADS
from diffcraft.train.config import RunConfig
from diffcraft.train.names import (ACTIVE_UNITS, BETA, EPOCH, EPOCH_SECONDS, F0_LOSS, KL, KL_PER_DIM, LATENT_VARIANCE,
                                   LOUDNESS_LOSS, LOUDNESS_MAE_DB, LR, MEAN_SIGMA, MSS, N_CLIPS, PER_DIMENSION, RCA, RPA,
                                   SHUFFLE_GAP, STEP, THROUGHPUT, TRAIN, TRAIN_LOSS, VAL, VAL_ACTIVE_UNITS,
                                   VAL_LATENT_DIMS, VAL_LOSS, per_head, summary_names)

DECODER_SCORES = (MSS,)  # the per-clip scores of each part, as the validation summaries report them
ENCODER_SCORES = (F0_LOSS, LOUDNESS_LOSS, RPA, RCA, LOUDNESS_MAE_DB)
VAE_SCORES = (KL,)


def epoch_metric_names(cfg: RunConfig) -> set[str]:
    """The keys of one epoch's metrics (`train.loop.epoch_metrics`) for `cfg`, given two
    validation clips or more (the z-shuffle gap compares clips within a batch)."""
    names = {EPOCH, STEP, LR, EPOCH_SECONDS, THROUGHPUT, TRAIN_LOSS, VAL_LOSS, VAL + N_CLIPS}
    if cfg.model.has_decoder:
        names |= {TRAIN + MSS} | summary_names(DECODER_SCORES, VAL)
    heads = LATENT_HEADS[cfg.model.encoder.encoding]
    if cfg.model.has_encoder:
        names |= {TRAIN + F0_LOSS, TRAIN + LOUDNESS_LOSS, VAL_ACTIVE_UNITS, VAL_LATENT_DIMS, VAL + LATENT_VARIANCE}
        names |= summary_names(ENCODER_SCORES, VAL) | {VAL + per_head(ACTIVE_UNITS, h) for h in heads}
        if cfg.data.batch_size >= 2 and cfg.data.validation_clips != 1:
            names |= {VAL + SHUFFLE_GAP} | {VAL + per_head(SHUFFLE_GAP, h) for h in heads}
    if cfg.model.is_vae:
        names |= {BETA, TRAIN + KL, VAL + KL_PER_DIM, VAL + MEAN_SIGMA} | summary_names(VAE_SCORES, VAL)
        names |= {VAL + per_head(KL, h) for h in heads}
    return names


def scalar_metric_names(cfg: RunConfig) -> set[str]:
    """The epoch metrics that are one number: what an objective or a constraint can name."""
    return epoch_metric_names(cfg) - set(PER_DIMENSION)


def ignored_fields(cfg: RunConfig) -> dict[str, str]:
    """Dotted config sections and fields that training `cfg` never reads -> why."""
    out = {}
    if not cfg.model.has_encoder:
        out.update({"model.encoder": "the decoder stage has no encoder",
                    "loss.f0": "the decoder stage has no F0 estimate",
                    "loss.loudness": "the decoder stage has no loudness estimate"})
    if not cfg.model.has_decoder:
        out.update({"model.decoder": "the encoder stage has no decoder",
                    "loss.mss": "the encoder stage synthesises no audio"})
    if not cfg.model.is_vae:
        out["loss.kl"] = "only VAE latents (model.encoder.latent: vae) have a KL term"
    else:
        schedule = cfg.loss.kl.schedule
        unused = {"constant": ("beta_start", "warmup_steps", "cycles", "ratio"),
                  "linear": ("cycles", "ratio"), "cyclical": ("warmup_steps",)}[schedule]
        out.update({f"loss.kl.{name}": f"the {schedule} KL schedule does not use it" for name in unused})
    return out


def ignores(cfg: RunConfig, key: str) -> str | None:
    """Why training `cfg` never reads the dotted field `key`, or None when it does."""
    for prefix, why in ignored_fields(cfg).items():
        if key == prefix or key.startswith(prefix + "."):
            return why
    return None


def clip_fit_problems(cfg: RunConfig) -> dict[str, str]:
    """Dotted fields whose sizes a training clip (CLIP_SECONDS long) cannot hold -> the problem."""
    out = {}
    if cfg.model.has_decoder:
        d = cfg.model.decoder
        if d.reverb_seconds > CLIP_SECONDS:
            out["model.decoder.reverb_seconds"] = (
                f"{d.reverb_seconds:g} s is longer than a training clip ({CLIP_SECONDS:g} s): the impulse response "
                "beyond the clip never reaches the output and never learns")
        taps = 2 * (d.n_noise_bands - 1)
        if taps > CLIP_SAMPLES:
            out["model.decoder.n_noise_bands"] = (f"{d.n_noise_bands} bands make a {taps}-tap noise filter, longer "
                                                  f"than a training clip ({CLIP_SAMPLES} samples)")
    return out
