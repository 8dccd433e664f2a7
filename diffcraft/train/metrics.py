"""Summary statistics as the paper reports them: mean ± standard error, and standard deviation."""
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


def cents_error(pred_hz: torch.Tensor, true_hz: torch.Tensor) -> torch.Tensor:
    return 1200.0 * torch.log2(pred_hz.clamp_min(1e-3) / true_hz.clamp_min(1e-3))


def raw_pitch_accuracy(pred_hz, true_hz, voiced, tolerance_cents: float = 50.0) -> float:
    """Share of voiced frames whose F0 is within `tolerance_cents` of the truth."""
    error = cents_error(pred_hz[voiced], true_hz[voiced]).abs()
    return float((error <= tolerance_cents).float().mean()) if error.numel() else float("nan")


def raw_chroma_accuracy(pred_hz, true_hz, voiced, tolerance_cents: float = 50.0) -> float:
    """As raw pitch accuracy, with octave errors forgiven (error folded into one octave)."""
    error = cents_error(pred_hz[voiced], true_hz[voiced])
    folded = (error + 600.0).remainder(1200.0) - 600.0
    return float((folded.abs() <= tolerance_cents).float().mean()) if folded.numel() else float("nan")


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al.'s active units over (example, frame) pairs: a latent dimension is active when
    the variance of its posterior mean across the data exceeds `threshold`.
    mu: [..., latent] -> (count, per-dimension variance [latent])."""
    flat = mu.reshape(-1, mu.shape[-1]).double()
    variance = flat.var(dim=0, unbiased=True) if flat.shape[0] > 1 else torch.zeros(flat.shape[-1])
    return int((variance > threshold).sum()), variance.float()
