"""Synthesis processors: each turns raw network outputs into controls, then controls into audio.

The `forward` of each reads like the paper's block diagram; the math lives in `dsp.core`.
"""
from __future__ import annotations

import torch
from torch import nn

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.dsp import core


class Harmonic(nn.Module):
    """Harmonic oscillator bank driven by f0, a total amplitude and a harmonic distribution."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, hop: int = HOP_LENGTH):
        super().__init__()
        self.sample_rate, self.hop = sample_rate, hop

    def controls(self, amplitude_raw, distribution_raw, f0_hz) -> dict[str, torch.Tensor]:
        """amplitude_raw [B, T, 1], distribution_raw [B, T, K], f0_hz [B, T] -> per-harmonic amplitudes."""
        amplitude = core.exp_sigmoid(amplitude_raw)
        distribution = core.normalize_harmonics(core.exp_sigmoid(distribution_raw), f0_hz, self.sample_rate)
        return {"amplitude": amplitude, "distribution": distribution,
                "harmonic_amplitudes": amplitude * distribution, "f0_hz": f0_hz}

    def forward(self, amplitude_raw, distribution_raw, f0_hz) -> torch.Tensor:
        c = self.controls(amplitude_raw, distribution_raw, f0_hz)
        return core.harmonic_synthesis(c["f0_hz"], c["harmonic_amplitudes"], self.hop, self.sample_rate)


class FilteredNoise(nn.Module):
    """White noise through a per-frame linear-phase FIR; starts near silent (bias -5)."""

    def __init__(self, hop: int = HOP_LENGTH, initial_bias: float = -5.0):
        super().__init__()
        self.hop, self.initial_bias = hop, initial_bias

    def forward(self, magnitudes_raw: torch.Tensor) -> torch.Tensor:
        return core.filtered_noise(core.exp_sigmoid(magnitudes_raw + self.initial_bias), self.hop)


class Reverb(nn.Module):
    """A learned room impulse response shared by the whole dataset, plus the dry signal."""

    def __init__(self, length: int = 48000, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        t = torch.arange(length) / sample_rate
        self.ir = nn.Parameter(1e-3 * torch.randn(length) * torch.exp(-6.0 * t))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        wet_ir = torch.cat([self.ir.new_zeros(1), self.ir[1:]])  # tap 0 is the dry path's
        return audio + core.fft_convolve(audio, wet_ir)
