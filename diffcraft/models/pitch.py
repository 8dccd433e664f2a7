"""The F0 decoder's bin layout: 435 cells of 20 cents whose edges run from A0 to C8.

Cents are relative to 10 Hz. Cell k spans [A0 + 20k, A0 + 20(k+1)] cents, so its centre is
A0 * 2^((10 + 20k) / 1200): the first centre is 27.66 Hz, the last 4161.9 Hz, and A0 and C8 are
the outer edges (a "centres at A0" layout would need 436 bins to reach C8).
"""
from __future__ import annotations

import math

import torch

N_BINS = 435
CENTS_PER_BIN = 20.0
A0_HZ = 27.5
C8_HZ = 4186.009044809578
A0_CENTS = 1200.0 * math.log2(A0_HZ / 10.0)
TARGET_SIGMA_CENTS = 25.0
PEAK_WINDOW = 4  # bins either side of the argmax used by the weighted-mean estimate


def bin_centres_cents(device=None) -> torch.Tensor:
    """[435] cents above 10 Hz of each bin centre."""
    return A0_CENTS + CENTS_PER_BIN * (torch.arange(N_BINS, device=device, dtype=torch.float32) + 0.5)


def blurred_targets(f0_hz: torch.Tensor, sigma_cents: float = TARGET_SIGMA_CENTS) -> torch.Tensor:
    """Gaussian-blurred bin targets exp(-(c_i - c)^2 / (2 sigma^2)): [..., frames] -> [..., frames, 435]."""
    cents = 1200.0 * torch.log2(f0_hz.clamp_min(1.0) / 10.0)
    return torch.exp(-0.5 * ((bin_centres_cents(f0_hz.device) - cents[..., None]) / sigma_cents) ** 2)


def decode_f0(probabilities: torch.Tensor) -> torch.Tensor:
    """F0 in Hz as the probability-weighted mean of the bin centres within PEAK_WINDOW bins of the
    most probable bin (the paper's weighted mean, kept local as CREPE does so that mass on a far
    octave does not drag the estimate between notes). [..., 435] -> [...]."""
    peak = probabilities.argmax(-1, keepdim=True)
    bins = torch.arange(N_BINS, device=probabilities.device)
    weights = probabilities * ((bins - peak).abs() <= PEAK_WINDOW)
    cents = (weights * bin_centres_cents(probabilities.device)).sum(-1) / weights.sum(-1).clamp_min(1e-8)
    return 10.0 * torch.pow(2.0, cents / 1200.0)
