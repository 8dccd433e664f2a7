"""Losses shared by training and evaluation."""
from __future__ import annotations

import torch
from torch import nn

from diffcraft.audio.features import hann_window, scale_loudness
from diffcraft.pitch import blurred_targets

FFT_SIZES = (2048, 1024, 512, 256, 128, 64)


def magnitude_spectrogram(audio: torch.Tensor, n_fft: int, overlap: float = 0.75,
                         eps: float = 1e-10) -> torch.Tensor:
    """|STFT| without centring, zero-padded at the end so every sample is in a frame:
    [batch, n_samples] -> [batch, frames, bins]. Framed by `unfold` and a real FFT, whose backward
    (one inverse real FFT) is several times cheaper than `torch.stft`'s."""
    hop = int(n_fft * (1 - overlap))
    n = audio.shape[-1]
    frames = 1 + max(0, -(-(n - n_fft) // hop))
    padded = torch.nn.functional.pad(audio, (0, (frames - 1) * hop + n_fft - n))
    spec = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * hann_window(n_fft, str(audio.device)))
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


# ---------------------------------------------------------------- encoder losses

def f0_loss(logits: torch.Tensor, f0_hz: torch.Tensor, voiced: torch.Tensor,
            per_example: bool = False) -> torch.Tensor:
    """Cross-entropy of the softmax over the 435 bins against the Gaussian-blurred target (sigma
    25 cents) normalised to sum to 1, as the paper defines it; averaged over voiced frames only
    (per clip when per_example: [B], nan for a clip without voiced frames).
    logits [B, T, 435], f0_hz/voiced [B, T]. (Per-bin sigmoid cross-entropy, CREPE's loss, gave
    the few true bins almost no gradient and did not learn here.)"""
    target = blurred_targets(f0_hz)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-8)
    per_frame = -(target * torch.log_softmax(logits, dim=-1)).sum(-1)
    mask = voiced.float()
    if per_example:
        return (per_frame * mask).sum(-1) / mask.sum(-1)
    return (per_frame * mask).sum() / mask.sum().clamp_min(1.0)


def loudness_loss(pred_db: torch.Tensor, true_db: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """MSE + MAE on loudness scaled to [0, 1] (dB / 80 + 1); per clip [B] when per_example."""
    diff = scale_loudness(pred_db) - scale_loudness(true_db)
    if per_example:
        return diff.square().mean(-1) + diff.abs().mean(-1)
    return diff.square().mean() + diff.abs().mean()


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension, in nats per frame, averaged over batch
    and frames: [..., latent] -> [latent]."""
    return kl_terms(mu, logvar).reshape(-1, mu.shape[-1]).mean(0)


def kl_terms(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) of every element, in nats: the shape of mu."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


def kl_with_free_bits(kl_dims: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over dimensions of max(free_bits, KL_d): dimensions under the floor get no gradient."""
    return kl_dims.clamp_min(free_bits).sum() if free_bits > 0 else kl_dims.sum()


def kl_beta(step: int, schedule: str, beta: float, beta_start: float = 0.0, warmup_steps: int = 0,
            cycles: int = 4, ratio: float = 0.5, total_steps: int = 1) -> float:
    """KL weight at `step`.

    constant: beta. linear: beta_start -> beta over warmup_steps, then beta. cyclical (Fu et al.
    2019): the schedule repeats `cycles` times over total_steps; in each cycle beta rises linearly
    from beta_start over the first `ratio` of the cycle, then stays at beta.
    """
    if schedule == "constant":
        return beta
    if schedule == "linear":
        if warmup_steps <= 0 or step >= warmup_steps:
            return beta
        return beta_start + (beta - beta_start) * step / warmup_steps
    if schedule == "cyclical":
        period = max(1.0, total_steps / max(cycles, 1))
        tau = (step % period) / period
        return beta if tau >= ratio else beta_start + (beta - beta_start) * tau / ratio
    raise ValueError(f"KL schedule {schedule!r} is not constant, linear or cyclical")
