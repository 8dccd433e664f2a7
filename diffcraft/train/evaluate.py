"""Per-epoch evaluation on validation clips: the paper's statistics plus collapse diagnostics."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from diffcraft.pitch import raw_chroma_accuracy, raw_pitch_accuracy
from diffcraft.train.metrics import active_units, mean_se_sd
from diffcraft.train.objective import VOICED, latent_kl_dims, loss_terms

MAX_LATENT_FRAMES = 200_000  # posterior means kept for active units (a random subset beyond)


@contextmanager
def seeded(seed: int = 0):
    """Draw noise from streams seeded with `seed`, and leave the caller's streams (CPU and every
    CUDA device) exactly as they were: the same weights always score the same, and training goes
    on drawing what it would have drawn had no evaluation run."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _shuffle_gap(model, out: dict, terms: dict, batch: dict, mss_fn) -> float | None:
    """Supervised F0 + loudness loss with z rolled across the batch, minus the loss with its own z
    (`terms`, already measured on this batch): about 0 when the decoders ignore z, whatever the
    KL says."""
    if batch["audio"].shape[0] < 2:
        return None
    encoder = model.encoder
    shuffled = {name: {**head, "z": head["z"].roll(1, dims=0)} for name, head in out["latents"].items()}
    other = loss_terms(encoder.decode(*encoder.split(shuffled)) | {"latents": {}}, batch, mss_fn)
    return float(other["f0_loss"] + other["loudness_loss"] - terms["f0_loss"] - terms["loudness_loss"])


def evaluate(model, loader, mss_fn, device, autocast) -> dict:
    """Validation metrics: MSS per clip (mean, standard error, standard deviation), F0 raw pitch
    and chroma accuracy, loudness MAE in dB, and for the encoder the latent diagnostics: KL per
    dimension, active units, mean posterior sigma, the z-shuffle gap. Noise is seeded, so the
    same weights always score the same."""
    model.eval()
    mss, f0_pred, f0_true, voiced, loud_err = [], [], [], [], []
    f0_losses, loud_losses, kls, mus, sigmas, gaps = [], [], [], [], [], []
    with torch.no_grad(), seeded(0):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                out = model(batch["audio"], batch["f0_hz"], batch["loudness_db"])
            terms = loss_terms(out, batch, mss_fn, per_example=True)
            if "mss" in terms:
                mss.append(terms["mss"].cpu())
            if "f0_logits" in out:
                f0_losses.append(float(terms["f0_loss"]))
                loud_losses.append(float(terms["loudness_loss"]))
                f0_pred.append(out["f0_hz"].cpu())
                f0_true.append(batch["f0_hz"].cpu())
                voiced.append((batch["voicing"] >= VOICED).cpu())
                loud_err.append((out["loudness_db"] - batch["loudness_db"]).abs().mean(-1).cpu())
                heads = list(out["latents"].values())
                mu = torch.cat([h["mu"].float() for h in heads], -1)
                mus.append(mu.reshape(-1, mu.shape[-1]).cpu())
                kl = latent_kl_dims(out["latents"])
                if kl is not None:
                    kls.append(kl.cpu())
                    sigmas.append(torch.cat([torch.exp(0.5 * h["logvar"]).mean().reshape(1) for h in heads]).mean())
                gap = _shuffle_gap(model, out, terms, batch, mss_fn)
                if gap is not None:
                    gaps.append(gap)
    model.train()
    metrics: dict = {}
    if mss:
        mean, se, sd = mean_se_sd(torch.cat(mss))
        metrics.update(val_mss_mean=mean, val_mss_se=se, val_mss_sd=sd, val_n_clips=int(torch.cat(mss).numel()))
    if f0_pred:
        pred, true, mask = torch.cat(f0_pred), torch.cat(f0_true), torch.cat(voiced)
        mae_mean, mae_se, mae_sd = mean_se_sd(torch.cat(loud_err))
        metrics.update(val_f0_loss=sum(f0_losses) / len(f0_losses),
                       val_loudness_loss=sum(loud_losses) / len(loud_losses),
                       val_rpa=raw_pitch_accuracy(pred, true, mask), val_rca=raw_chroma_accuracy(pred, true, mask),
                       val_loudness_mae_db=mae_mean, val_loudness_mae_db_se=mae_se)
        all_mu = torch.cat(mus)
        if all_mu.shape[0] > MAX_LATENT_FRAMES:
            all_mu = all_mu[torch.randperm(all_mu.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_LATENT_FRAMES]]
        count, variance = active_units(all_mu)
        metrics.update(val_active_units=count, val_latent_dims=int(all_mu.shape[-1]),
                       val_latent_variance=variance.tolist())
        if gaps:
            metrics["val_shuffle_gap"] = sum(gaps) / len(gaps)
        if kls:
            kl = torch.stack(kls).mean(0)
            metrics.update(val_kl=float(kl.sum()), val_kl_per_dim=kl.tolist(),
                           val_mean_sigma=float(torch.stack(sigmas).mean()))
    return metrics
