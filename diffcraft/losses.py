"""Losses shared by training and evaluation."""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

FFT_SIZES = (2048, 1024, 512, 256, 128, 64)


@lru_cache(maxsize=32)
def _hann(size: int, device: str) -> torch.Tensor:
    return torch.hann_window(size, device=device)


def magnitude_spectrogram(audio: torch.Tensor, n_fft: int, overlap: float = 0.75,
                         eps: float = 1e-10) -> torch.Tensor:
    """|STFT| without centring, zero-padded at the end so every sample is in a frame:
    [batch, n_samples] -> [batch, frames, bins]. Framed by `unfold` and a real FFT, whose backward
    (one inverse real FFT) is several times cheaper than `torch.stft`'s."""
    hop = int(n_fft * (1 - overlap))
    n = audio.shape[-1]
    frames = 1 + max(0, -(-(n - n_fft) // hop))
    padded = torch.nn.functional.pad(audio, (0, (frames - 1) * hop + n_fft - n))
    spec = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * _hann(n_fft, str(audio.device)))
    return torch.view_as_real(spec).square().sum(-1).add(eps).sqrt()


class MultiScaleSpectralLoss(nn.Module):
    """Sum over FFT sizes (2048 .. 64, 75 % overlap) of mean |S - S'| + mean |log S - log S'|.

    `forward(pred, target)` gives the batch mean; `per_example` gives one value per clip, which
    evaluation uses for the mean, standard error and standard deviation over clips.
    """

    def __init__(self, fft_sizes=FFT_SIZES, overlap: float = 0.75, mag_weight: float = 1.0,
                 logmag_weight: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.fft_sizes, self.overlap = tuple(fft_sizes), overlap
        self.mag_weight, self.logmag_weight, self.eps = mag_weight, logmag_weight, eps

    def per_example(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: [batch, n_samples] -> [batch]."""
        total = pred.new_zeros(pred.shape[0])
        for n_fft in self.fft_sizes:
            s_pred = magnitude_spectrogram(pred, n_fft, self.overlap)
            s_true = magnitude_spectrogram(target, n_fft, self.overlap)
            if self.mag_weight:
                total = total + self.mag_weight * (s_pred - s_true).abs().mean(dim=(1, 2))
            if self.logmag_weight:
                log_diff = torch.log(s_pred.clamp_min(self.eps)) - torch.log(s_true.clamp_min(self.eps))
                total = total + self.logmag_weight * log_diff.abs().mean(dim=(1, 2))
        return total

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_example(pred, target).mean()
