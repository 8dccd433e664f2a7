"""Evaluation: every metric scored per clip, so each can be reported as the paper does (mean ±
standard error, standard deviation over clips) and two configurations can be compared clip by
clip; plus the latent diagnostics of posterior collapse, which describe the whole set.

`evaluate` is the per-epoch validation; `score_split` scores a whole split of the cache at a
chosen checkpoint (the test numbers a report cites), keeping each clip's name.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from diffcraft.losses import kl_terms
from diffcraft.pitch import raw_chroma_accuracy, raw_pitch_accuracy
from diffcraft.train.metrics import active_units, mean_se_sd
from diffcraft.train.loss import VOICED, latent_kl_dims, loss_terms
from diffcraft.train.names import ACTIVE_UNITS, KL, MEAN_NAMES, SHUFFLE_GAP, per_head

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


def _shuffle_gap(model, out: dict, terms: dict, batch: dict, mss_fn, autocast,
                 heads: tuple[str, ...] | None = None) -> torch.Tensor | None:
    """Per clip: supervised F0 + loudness loss with z rolled across the batch (in `heads`, default
    every head), minus the loss with its own z (`terms`, already measured): about 0 when the
    decoders ignore that z, whatever the KL says. The decoders run under the same autocast as the
    forward pass that made z."""
    if batch["audio"].shape[0] < 2:
        return None
    encoder = model.encoder
    shuffled = {name: {**head, "z": head["z"].roll(1, dims=0)} if heads is None or name in heads else head
                for name, head in out["latents"].items()}
    with autocast():
        decoded = encoder.decode(*encoder.split(shuffled))
    other = loss_terms(decoded | {"latents": {}}, batch, mss_fn, per_example=True)
    return other["f0_loss"] + other["loudness_loss"] - terms["f0_loss"] - terms["loudness_loss"]


def _head_diagnostics(mu: torch.Tensor, dims: dict[str, int], head_scores: dict[str, list]) -> dict:
    """Active units of each latent head (its slice of the posterior means), and the mean over
    clips of its KL and shuffle gap: which head collapsed, where the totals only say that one did.
    mu: [frames, latent dims], the heads' dimensions side by side in `dims` order."""
    out, start = {}, 0
    for head, size in dims.items():
        out[per_head(ACTIVE_UNITS, head)] = active_units(mu[:, start: start + size])[0]
        start += size
    for name, values in head_scores.items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            out[name] = sum(finite) / len(finite)
    return out


def _pitch_accuracies(pred: torch.Tensor, true: torch.Tensor, voiced: torch.Tensor) -> tuple[list, list]:
    """Raw pitch and raw chroma accuracy of each clip (nan for a clip without voiced frames)."""
    rpa = [raw_pitch_accuracy(p, t, v) for p, t, v in zip(pred, true, voiced)]
    rca = [raw_chroma_accuracy(p, t, v) for p, t, v in zip(pred, true, voiced)]
    return rpa, rca


def clip_scores(model, loader, mss_fn, device, autocast) -> tuple[dict[str, torch.Tensor], dict]:
    """({score: [n_clips] in loader order}, the latent diagnostics of the whole set). Noise is
    seeded, so the same weights always score the same."""
    model.eval()
    scores: dict[str, list] = {}
    mus, kls, sigmas = [], [], []
    dims: dict[str, int] = {}  # latent head -> its dimensions
    head_scores: dict[str, list] = {}  # per-head KL and shuffle gap, per clip

    def add(name, values):
        scores.setdefault(name, []).extend(torch.as_tensor(values, dtype=torch.float64).reshape(-1).tolist())

    with torch.no_grad(), seeded(0):
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                out = model(batch["audio"], batch["f0_hz"], batch["loudness_db"])
            terms = loss_terms(out, batch, mss_fn, per_example=True)
            if "mss" in terms:
                add("mss", terms["mss"].float().cpu())
            if "f0_logits" not in out:
                continue
            voiced = (batch["voicing"] >= VOICED).cpu()
            add("f0_loss", terms["f0_loss"].float().cpu())
            add("loudness_loss", terms["loudness_loss"].float().cpu())
            rpa, rca = _pitch_accuracies(out["f0_hz"].float().cpu(), batch["f0_hz"].cpu(), voiced)
            add("rpa", rpa)
            add("rca", rca)
            add("loudness_mae_db", (out["loudness_db"] - batch["loudness_db"]).abs().float().mean(-1).cpu())
            heads = list(out["latents"].values())
            dims = {name: h["mu"].shape[-1] for name, h in out["latents"].items()}
            mu = torch.cat([h["mu"].float() for h in heads], -1)
            mus.append(mu.reshape(-1, mu.shape[-1]).cpu())
            if all("logvar" in h for h in heads):
                per_clip = {name: kl_terms(h["mu"].float(), h["logvar"].float()).mean(1).sum(-1).cpu()
                            for name, h in out["latents"].items()}
                add("kl", sum(per_clip.values()))
                for name, values in per_clip.items():
                    head_scores.setdefault(per_head(KL, name), []).extend(values.tolist())
                kls.append(latent_kl_dims(out["latents"]).cpu())
                sigmas.append(torch.cat([torch.exp(0.5 * h["logvar"]).mean().reshape(1) for h in heads]).mean())
            gap = _shuffle_gap(model, out, terms, batch, mss_fn, autocast)  # none for a batch of one clip: nan keeps
            add("shuffle_gap", gap.float().cpu() if gap is not None else [float("nan")])  # clips aligned
            for name in dims:  # one head: its gap is the total
                one = gap if len(dims) == 1 else _shuffle_gap(model, out, terms, batch, mss_fn, autocast, (name,))
                head_scores.setdefault(per_head(SHUFFLE_GAP, name), []).extend(
                    one.float().cpu().tolist() if one is not None else [float("nan")])
    model.train()
    latent: dict = {}
    if mus:
        all_mu = torch.cat(mus)
        if all_mu.shape[0] > MAX_LATENT_FRAMES:
            all_mu = all_mu[torch.randperm(all_mu.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_LATENT_FRAMES]]
        count, variance = active_units(all_mu)
        latent.update(active_units=count, latent_dims=int(all_mu.shape[-1]), latent_variance=variance.tolist())
        latent.update(_head_diagnostics(all_mu, dims, head_scores))
        if kls:
            latent.update(kl_per_dim=torch.stack(kls).mean(0).tolist(), mean_sigma=float(torch.stack(sigmas).mean()))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in scores.items()}, latent


def summarize(scores: dict[str, torch.Tensor], prefix: str) -> dict:
    """`{prefix}{score}` (mean over the clips that have it), `..._se` and `..._sd` of every
    per-clip score, and `{prefix}n_clips`. The shuffle gap is reported as its mean alone."""
    out: dict = {}
    for name, values in scores.items():
        values = values[~torch.isnan(values)]
        mean, se, sd = mean_se_sd(values)
        out[prefix + MEAN_NAMES.get(name, name)] = mean
        if name != "shuffle_gap":
            out[f"{prefix}{name}_se"], out[f"{prefix}{name}_sd"] = se, sd
    if scores:
        out[prefix + "n_clips"] = max(len(v) for v in scores.values())
    return out


def evaluate(model, loader, mss_fn, device, autocast) -> dict:
    """The epoch's validation metrics (`val_`): per-clip summaries and latent diagnostics."""
    scores, latent = clip_scores(model, loader, mss_fn, device, autocast)
    metrics = summarize(scores, "val_")
    metrics.update({f"val_{k}": v for k, v in latent.items()})
    return metrics


def score_split(model, cache: str, split: str, batch_size: int = 8, device: str = "cpu") -> tuple[list[str], dict]:
    """Every clip of one split of the cache at this model's weights, in fp32: (clip names,
    {score: [n_clips]}). Names are `song/file#index`, the same for every model scored on the cache."""
    from contextlib import nullcontext

    from torch.utils.data import DataLoader

    from diffcraft.data.dataset import ClipDataset
    from diffcraft.losses import MultiScaleSpectralLoss

    clips = ClipDataset(cache, split)
    scores, _ = clip_scores(model.to(device), DataLoader(clips, batch_size=batch_size), MultiScaleSpectralLoss(),
                            torch.device(device), nullcontext)
    return clips.clip_names(), scores
