"""What a run config's stage reports each epoch, which config fields it reads, and which sizes a
training clip can hold: declared next to the loop that produces them, so a study can be checked
before anything trains. `tests/test_review.py` trains one epoch of every stage and compares the
keys it reports with `epoch_metric_names`, so the declaration cannot drift from the loop.
"""
from __future__ import annotations

from diffcraft import CLIP_SAMPLES, CLIP_SECONDS
from diffcraft.train.config import RunConfig

PER_DIMENSION = ("val_latent_variance", "val_kl_per_dim")  # lists, one value per latent dimension


def has_decoder(cfg: RunConfig) -> bool:
    return cfg.model.stage in ("decoder", "joint")


def has_encoder(cfg: RunConfig) -> bool:
    return cfg.model.stage in ("encoder", "joint")


def is_vae(cfg: RunConfig) -> bool:
    return has_encoder(cfg) and cfg.model.encoder.latent == "vae"


def epoch_metric_names(cfg: RunConfig) -> set[str]:
    """The keys of one epoch's metrics (`train.loop.epoch_metrics`) for `cfg`, given two
    validation clips or more (the z-shuffle gap compares clips within a batch)."""
    names = {"epoch", "step", "lr", "epoch_seconds", "audio_seconds_per_second", "train_loss", "val_loss",
             "val_n_clips"}
    if has_decoder(cfg):
        names |= {"train_mss"} | clip_metric_names(["mss"], "val_")
    if has_encoder(cfg):
        names |= {"train_f0_loss", "train_loudness_loss", "val_active_units", "val_latent_dims", "val_latent_variance"}
        names |= clip_metric_names(["f0_loss", "loudness_loss", "rpa", "rca", "loudness_mae_db"], "val_")
        if cfg.data.batch_size >= 2 and cfg.data.validation_clips != 1:
            names.add("val_shuffle_gap")
    if is_vae(cfg):
        names |= {"beta", "train_kl", "val_kl_per_dim", "val_mean_sigma"} | clip_metric_names(["kl"], "val_")
    return names


def clip_metric_names(scores: list[str], prefix: str) -> set[str]:
    """What `train.evaluate.summarize` reports for per-clip scores: mean, standard error, SD."""
    from diffcraft.train.evaluate import MEAN_NAMES

    return {prefix + MEAN_NAMES.get(s, s) for s in scores} | {f"{prefix}{s}_{k}" for s in scores for k in ("se", "sd")}


def scalar_metric_names(cfg: RunConfig) -> set[str]:
    """The epoch metrics that are one number: what an objective or a constraint can name."""
    return epoch_metric_names(cfg) - set(PER_DIMENSION)


def ignored_fields(cfg: RunConfig) -> dict[str, str]:
    """Dotted config sections and fields that training `cfg` never reads -> why."""
    out = {}
    if not has_encoder(cfg):
        out.update({"model.encoder": "the decoder stage has no encoder",
                    "loss.f0": "the decoder stage has no F0 estimate",
                    "loss.loudness": "the decoder stage has no loudness estimate"})
    if not has_decoder(cfg):
        out.update({"model.decoder": "the encoder stage has no decoder",
                    "loss.mss": "the encoder stage synthesises no audio"})
    if not is_vae(cfg):
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
    if has_decoder(cfg):
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
