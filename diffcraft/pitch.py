"""Pitch math in one place: Hz, MIDI and cents, the F0 decoder's 435-bin grid, decoding a
distribution over pitch bins, and errors in cents.

Conversions take tensors (dtype and device kept) or anything numpy reads (returned as numpy).
Cents are relative to 10 Hz, the paper's f_ref and CREPE's: c(f) = 1200 log2(f / 10 Hz).

The grid (paper, Section III-C): the F0 decoder outputs "a 435-dimensional vector, with each
dimension representing a 20-cent frequency bin covering six octaves from A0 (27.50 Hz) to C8
(4186.01 Hz)". A0 is MIDI 21 and C8 MIDI 108: 87 semitones, 8700 cents, which 435 cells of 20
cents tile exactly (seven octaves and a quarter; "six octaves" is the paper's slip). So A0 and C8
are the outer edges: cell k spans [A0 + 20k, A0 + 20(k+1)] cents, its centre is
A0 * 2^((10 + 20k) / 1200), the first centre 27.66 Hz and the last 4161.9 Hz (a "centres at A0"
layout would need 436 bins to reach C8).

Targets are the true F0 Gaussian-blurred over the bin centres, sigma 25 cents:
y_i = exp(-(c_i - c_true)^2 / (2 * 25^2)). The estimate is the probability-weighted mean of the
bin centres: over all bins as the paper writes it, or (the default) within 4 bins of the most
probable bin as CREPE decodes, so that mass on a far octave does not drag the estimate between notes.
"""
from __future__ import annotations

import math

import numpy as np
import torch

REF_HZ = 10.0  # cents are relative to this frequency
A4_HZ = 440.0
A4_MIDI = 69.0
A0_MIDI = 21  # lowest piano key, the grid's lower edge
C8_MIDI = 108  # highest piano key, the grid's upper edge

A0_HZ = 27.5
A0_CENTS = 1200.0 * math.log2(A0_HZ / REF_HZ)
CENTS_PER_BIN = 20.0
N_BINS = 435  # (C8_MIDI - A0_MIDI) * 100 cents / CENTS_PER_BIN
TARGET_SIGMA_CENTS = 25.0
DECODE_WINDOW_BINS = 4  # bins either side of the peak that the decoded mean reads
TOLERANCE_CENTS = 50.0  # raw pitch and raw chroma accuracy count errors up to this


# ---------------------------------------------------------------- Hz, MIDI and cents

def hz_to_cents(f0_hz, ref_hz: float = REF_HZ):
    """Cents above 10 Hz (the F0 decoder's and CREPE's reference)."""
    if isinstance(f0_hz, torch.Tensor):
        return 1200.0 * torch.log2(f0_hz / ref_hz)
    return 1200.0 * np.log2(np.asarray(f0_hz) / ref_hz)


def cents_to_hz(cents, ref_hz: float = REF_HZ):
    """The inverse of hz_to_cents."""
    if isinstance(cents, torch.Tensor):
        return ref_hz * torch.pow(2.0, cents / 1200.0)
    return ref_hz * 2.0 ** (np.asarray(cents) / 1200.0)


def hz_to_midi(f0_hz):
    """MIDI note number (A4 = 440 Hz = 69), fractional between keys."""
    if isinstance(f0_hz, torch.Tensor):
        return A4_MIDI + 12.0 * torch.log2(f0_hz / A4_HZ)
    return A4_MIDI + 12.0 * np.log2(np.asarray(f0_hz) / A4_HZ)


def midi_to_hz(midi):
    """The inverse of hz_to_midi: piano key 21 (A0) is 27.5 Hz, 108 (C8) 4186.01 Hz."""
    if isinstance(midi, torch.Tensor):
        return A4_HZ * torch.pow(2.0, (midi - A4_MIDI) / 12.0)
    return A4_HZ * 2.0 ** ((np.asarray(midi) - A4_MIDI) / 12.0)


# ---------------------------------------------------------------- the F0 decoder's grid

def bin_centres_cents(device=None) -> torch.Tensor:
    """[435] cents above 10 Hz of each bin centre."""
    return A0_CENTS + CENTS_PER_BIN * (torch.arange(N_BINS, device=device, dtype=torch.float32) + 0.5)


def blurred_targets(f0_hz: torch.Tensor, sigma_cents: float = TARGET_SIGMA_CENTS) -> torch.Tensor:
    """Gaussian-blurred bin targets exp(-(c_i - c)^2 / (2 sigma^2)): [..., frames] -> [..., frames, 435]."""
    cents = hz_to_cents(f0_hz.clamp_min(1.0))
    return torch.exp(-0.5 * ((bin_centres_cents(f0_hz.device) - cents[..., None]) / sigma_cents) ** 2)


def peak_weighted_hz(probabilities: torch.Tensor, bin_cents: torch.Tensor,
                     window: int | None = DECODE_WINDOW_BINS) -> torch.Tensor:
    """Pitch from a distribution over pitch bins: the probability-weighted mean of the bin cents
    within `window` bins of the most probable bin (CREPE's decoding; kept local so that mass on a
    far octave does not drag the estimate between notes), or over every bin for `window=None`.
    [..., n_bins] -> Hz [...]."""
    weights = probabilities
    if window is not None:
        peak = probabilities.argmax(-1, keepdim=True)
        bins = torch.arange(probabilities.shape[-1], device=probabilities.device)
        weights = probabilities * ((bins - peak).abs() <= window)
    cents = (weights * bin_cents).sum(-1) / weights.sum(-1).clamp_min(1e-8)
    return cents_to_hz(cents)


def decode_f0(probabilities: torch.Tensor, window: int | None = DECODE_WINDOW_BINS) -> torch.Tensor:
    """F0 in Hz: the paper's weighted mean of the bin centres, within `window` bins of the most
    probable bin as CREPE does (default 4) or over all bins (None). [..., 435] -> [...]."""
    return peak_weighted_hz(probabilities, bin_centres_cents(probabilities.device), window)


# ---------------------------------------------------------------- errors in cents

def cents_error(pred_hz: torch.Tensor, true_hz: torch.Tensor) -> torch.Tensor:
    """Signed error in cents, pred above true positive; frequencies floored at 1 mHz."""
    return 1200.0 * torch.log2(pred_hz.clamp_min(1e-3) / true_hz.clamp_min(1e-3))


def fold_octaves(error_cents: torch.Tensor) -> torch.Tensor:
    """An error in cents folded into one octave, [-600, 600): an octave error becomes 0."""
    return (error_cents + 600.0).remainder(1200.0) - 600.0


def _share_within(error_cents: torch.Tensor, tolerance_cents: float) -> float:
    if not error_cents.numel():
        return float("nan")
    return float((error_cents.abs() <= tolerance_cents).float().mean())


def raw_pitch_accuracy(pred_hz, true_hz, voiced, tolerance_cents: float = TOLERANCE_CENTS) -> float:
    """Share of voiced frames whose F0 is within `tolerance_cents` of the truth (nan if none)."""
    return _share_within(cents_error(pred_hz[voiced], true_hz[voiced]), tolerance_cents)


def raw_chroma_accuracy(pred_hz, true_hz, voiced, tolerance_cents: float = TOLERANCE_CENTS) -> float:
    """As raw pitch accuracy, with octave errors forgiven (error folded into one octave)."""
    return _share_within(fold_octaves(cents_error(pred_hz[voiced], true_hz[voiced])), tolerance_cents)
