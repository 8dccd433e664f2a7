"""The training loss: the loss terms a stage uses, weighted and summed. The weights live here
alone: the training loss and the validation loss both use `weighted`. (What picks the best epoch
or trial is the objective, `train.selection`.)"""
from __future__ import annotations

import torch

from diffcraft.losses import f0_loss, kl_beta, kl_per_dim, kl_with_free_bits, loudness_loss
from diffcraft.train.config import LossConfig, RunConfig
from diffcraft.train.names import F0_LOSS, KL_PER_DIM, LOUDNESS_LOSS, MSS, VAL, mean_name

VOICED = 0.5  # voicing confidence at or above which a frame counts as voiced


def beta_at(cfg: LossConfig, step: int, total_steps: int) -> float:
    kl = cfg.kl
    return kl_beta(step, kl.schedule, kl.beta, kl.beta_start, kl.warmup_steps, kl.cycles, kl.ratio, total_steps)


def latent_kl_dims(latents: dict) -> torch.Tensor | None:
    """KL per dimension of every VAE latent head, concatenated: [total latent dims]."""
    parts = [kl_per_dim(h["mu"].float(), h["logvar"].float()) for h in latents.values() if "logvar" in h]
    return torch.cat(parts) if parts else None


def loss_terms(out: dict, batch: dict, mss_fn, per_example: bool = False) -> dict[str, torch.Tensor]:
    """Unweighted loss terms present in the model's outputs (the reconstruction terms per clip,
    [B], when per_example)."""
    terms = {}
    if "f0_logits" in out:
        voiced = batch["voicing"] >= VOICED
        terms[F0_LOSS] = f0_loss(out["f0_logits"], batch["f0_hz"], voiced, per_example)
        terms[LOUDNESS_LOSS] = loudness_loss(out["loudness_db"], batch["loudness_db"], per_example)
        kl_dims = latent_kl_dims(out["latents"])
        if kl_dims is not None:
            terms[KL_PER_DIM] = kl_dims
    if "synth" in out:
        audio = out["synth"]["audio"].float()
        terms[MSS] = mss_fn.per_example(audio, batch["audio"]) if per_example else mss_fn(audio, batch["audio"])
    return terms


def weighted(cfg: RunConfig, mss=None, f0=None, loudness=None):
    """The weighted sum of the reconstruction terms present (None: the stage has no such term)."""
    w = cfg.loss
    total = 0.0
    for weight, value in ((w.mss, mss), (w.f0, f0), (w.loudness, loudness)):
        if value is not None:
            total = total + weight * value
    return total


def total_loss(terms: dict, cfg: RunConfig, beta: float) -> torch.Tensor:
    total = weighted(cfg, terms[MSS].mean() if MSS in terms else None, terms.get(F0_LOSS),
                     terms.get(LOUDNESS_LOSS))
    if KL_PER_DIM in terms:
        total = total + beta * kl_with_free_bits(terms[KL_PER_DIM], cfg.loss.kl.free_bits)
    return total


def validation_loss(metrics: dict, cfg: RunConfig) -> float:
    """The weighted validation loss that picks the best checkpoint (KL left out)."""
    return float(weighted(cfg, metrics.get(mean_name(MSS, VAL)), metrics.get(VAL + F0_LOSS),
                          metrics.get(VAL + LOUDNESS_LOSS)))
