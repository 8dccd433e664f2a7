"""The F0 decoder's bin layout: 435 cells of 20 cents whose edges run from A0 to C8.

Cents are relative to 10 Hz. Cell k spans [A0 + 20k, A0 + 20(k+1)] cents, so its centre is
A0 * 2^((10 + 20k) / 1200): the first centre is 27.66 Hz, the last 4161.9 Hz, and A0 and C8 are
the outer edges (a "centres at A0" layout would need 436 bins to reach C8).
"""
from __future__ import annotations

import math

import torch

from diffcraft.audio.features import hz_to_cents, peak_weighted_hz

N_BINS = 435
CENTS_PER_BIN = 20.0
A0_HZ = 27.5
A0_CENTS = 1200.0 * math.log2(A0_HZ / 10.0)
TARGET_SIGMA_CENTS = 25.0


def bin_centres_cents(device=None) -> torch.Tensor:
    """[435] cents above 10 Hz of each bin centre."""
    return A0_CENTS + CENTS_PER_BIN * (torch.arange(N_BINS, device=device, dtype=torch.float32) + 0.5)


def blurred_targets(f0_hz: torch.Tensor, sigma_cents: float = TARGET_SIGMA_CENTS) -> torch.Tensor:
    """Gaussian-blurred bin targets exp(-(c_i - c)^2 / (2 sigma^2)): [..., frames] -> [..., frames, 435]."""
    cents = hz_to_cents(f0_hz.clamp_min(1.0))
    return torch.exp(-0.5 * ((bin_centres_cents(f0_hz.device) - cents[..., None]) / sigma_cents) ** 2)


def decode_f0(probabilities: torch.Tensor) -> torch.Tensor:
    """F0 in Hz: the paper's weighted mean of the bin centres, taken within 4 bins of the most
    probable bin as CREPE does. [..., 435] -> [...]."""
    return peak_weighted_hz(probabilities, bin_centres_cents(probabilities.device))
