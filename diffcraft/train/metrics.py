"""Summary statistics as the paper reports them (mean ± standard error, standard deviation) and the
latent diagnostic of active units. Pitch accuracies, being pitch math, live in `diffcraft.pitch`."""
from __future__ import annotations

import math

import torch


def mean_se_sd(values) -> tuple[float, float, float]:
    """Mean, standard error of the mean and sample standard deviation of a 1-D set of values."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    sd = float(values.std(unbiased=True)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n), sd


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al.'s active units over (example, frame) pairs: a latent dimension is active when
    the variance of its posterior mean across the data exceeds `threshold`.
    mu: [..., latent] -> (count, per-dimension variance [latent])."""
    flat = mu.reshape(-1, mu.shape[-1]).double()
    variance = flat.var(dim=0, unbiased=True) if flat.shape[0] > 1 else torch.zeros(flat.shape[-1])
    return int((variance > threshold).sum()), variance.float()
