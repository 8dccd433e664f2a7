"""Frame features in torch, batched, on any device, all aligned to one frame per 160 samples.

Frames are centred (frame i describes the samples around i * hop) with zero padding, and the
extra frame that centring adds is dropped, so a 4 s clip gives exactly 400 frames for every
feature, the same count CREPE labels get.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.pitch import A0_MIDI, C8_MIDI, midi_to_hz

N_FFT = 2048
WIN_LENGTH = 512
LOUDNESS_FLOOR_DB = -80.0
N_KEYS = 88  # piano keys A0 (MIDI 21) .. C8 (MIDI 108)
PCCC_COEFFS = 88  # cepstral coefficients from each of the DCT and the DST (all 88: invertible)


def n_frames(n_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames a signal of `n_samples` gets: one per hop (64000 samples -> 400)."""
    return n_samples // hop_length


def _batched(audio) -> tuple[torch.Tensor, bool]:
    audio = torch.as_tensor(audio, dtype=torch.float32)
    return (audio[None], True) if audio.dim() == 1 else (audio, False)


@lru_cache(maxsize=32)
def hann_window(size: int, device: str) -> torch.Tensor:
    """A periodic Hann window, made once per size and device."""
    return torch.hann_window(size, device=device)


def stft(audio, n_fft: int = N_FFT, win_length: int = WIN_LENGTH,
         hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """Complex STFT, centred with zero padding, last frame dropped.

    audio: [batch, n_samples] -> [batch, n_samples // hop, n_fft // 2 + 1] (complex64)
    """
    audio, squeeze = _batched(audio)
    spec = torch.stft(audio, n_fft, hop_length=hop_length, win_length=win_length,
                      window=hann_window(win_length, str(audio.device)), center=True,
                      pad_mode="constant", return_complex=True)
    spec = spec[..., : n_frames(audio.shape[-1], hop_length)].transpose(1, 2)
    return spec[0] if squeeze else spec


def log_magnitude_stft(audio, eps: float = 1e-5) -> torch.Tensor:
    """The STFT encoder's input: log |STFT|, n_fft 2048, Hann 512, hop 160 -> [batch, 400, 1025]."""
    return torch.log(stft(audio).abs().clamp_min(eps))


@lru_cache(maxsize=8)
def _a_weighting_power(n_fft: int, sample_rate: int, device: str) -> torch.Tensor:
    """IEC 61672 A-weighting as a power gain per rfft bin (0 dB at 1 kHz)."""
    f2 = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64) ** 2
    ra = (12194.0 ** 2 * f2 ** 2) / ((f2 + 20.6 ** 2) * torch.sqrt((f2 + 107.7 ** 2) * (f2 + 737.9 ** 2))
                                     * (f2 + 12194.0 ** 2))
    gain_db = 20 * torch.log10(ra.clamp_min(1e-20)) + 2.0
    return (10 ** (gain_db / 10)).float().to(device)


def a_weighted_loudness(audio, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                        win_length: int = WIN_LENGTH) -> torch.Tensor:
    """A-weighted mean power per frame in dB (dBFS RMS), floored at -80 dB.

    Power is normalised by Parseval, so a 1 kHz sine of amplitude a reads 10*log10(a^2 / 2):
    -3.01 dB at full scale. audio: [batch, n_samples] -> [batch, n_samples // 160]
    """
    audio, squeeze = _batched(audio)
    spec = stft(audio, n_fft, win_length)
    power = spec.real ** 2 + spec.imag ** 2
    bins = torch.full((n_fft // 2 + 1,), 2.0, device=audio.device)
    bins[0] = bins[-1] = 1.0  # DC and Nyquist appear once in the two-sided spectrum
    weight = bins * _a_weighting_power(n_fft, sample_rate, str(audio.device))
    window_energy = float((hann_window(win_length, str(audio.device)) ** 2).sum())
    mean_power = (power * weight).sum(-1) / (n_fft * window_energy)
    loudness = 10 * torch.log10(mean_power.clamp_min(10 ** (LOUDNESS_FLOOR_DB / 10)))
    return loudness[0] if squeeze else loudness


def scale_loudness(loudness_db: torch.Tensor) -> torch.Tensor:
    """What the networks see: [-80, 0] dB mapped to [0, 1]."""
    return loudness_db / -LOUDNESS_FLOOR_DB + 1.0


def unscale_loudness(scaled: torch.Tensor) -> torch.Tensor:
    """The inverse of scale_loudness: [0, 1] back to dB."""
    return (scaled - 1.0) * -LOUDNESS_FLOOR_DB


# ---------------------------------------------------------------- PCCC

@lru_cache(maxsize=4)
def piano_filterbank(n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                     min_width_bins: float = 1.0) -> np.ndarray:
    """88 triangular filters centred on the piano keys, on rfft bins: [88, n_fft // 2 + 1].

    Each triangle rises from the key below and falls to the key above, but each half-width is at
    least `min_width_bins` FFT bins: below C3 the keys are closer than one bin at n_fft 2048, and
    without the floor six filters would hold no bin at all. Rows are normalised to unit sum.
    """
    bin_hz = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    min_width = min_width_bins * sample_rate / n_fft
    midi = np.arange(A0_MIDI, C8_MIDI + 1)
    centre, below, above = midi_to_hz(midi), midi_to_hz(midi - 1), midi_to_hz(midi + 1)
    lower = np.maximum(centre - below, min_width)[:, None]
    upper = np.maximum(above - centre, min_width)[:, None]
    delta = bin_hz[None, :] - centre[:, None]
    rising = 1.0 + delta / lower
    falling = 1.0 - delta / upper
    tri = np.clip(np.where(delta < 0, rising, falling), 0.0, None)
    empty = midi[tri.sum(axis=1) == 0]
    if empty.size:
        raise ValueError(f"piano filters for MIDI {empty.tolist()} hold no FFT bin at n_fft {n_fft}; "
                         f"raise min_width_bins (now {min_width_bins})")
    return (tri / tri.sum(axis=1, keepdims=True)).astype(np.float32)


@lru_cache(maxsize=4)
def _cepstral_bases(n_keys: int, n_coeffs: int) -> tuple[np.ndarray, np.ndarray]:
    """DCT-II and DST bases of the paper: [n_keys, n_coeffs] each."""
    k = np.arange(n_keys)[:, None]
    m = np.arange(n_coeffs)[None, :]
    dct = np.cos(np.pi * m * (k + 0.5) / n_keys)
    dst = np.sin(np.pi * m * (k + 1) / n_keys)  # the paper's k runs 1..K
    return dct.astype(np.float32), dst.astype(np.float32)


@lru_cache(maxsize=8)
def _pccc_matrices(n_coeffs: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key filters and the DCT and DST bases, copied to `device` once: a copy from host memory
    in every training step would make the host wait for the GPU each time."""
    return tuple(torch.as_tensor(m, device=device) for m in (piano_filterbank(), *_cepstral_bases(N_KEYS, n_coeffs)))


def pccc(audio, n_coeffs: int = PCCC_COEFFS, eps: float = 1e-5) -> torch.Tensor:
    """Piano Complex Cepstral Coefficients: [batch, n_samples] -> [batch, 400, 2 * n_coeffs].

    The complex STFT goes through the 88 key filters (S = X H), its complex log is taken
    (log|S| + i arg S, the phase wrapped: it depends on the frame's time origin, so unwrapping
    across keys would add no information), then the DCT of the real part and the DST of the
    imaginary part are concatenated. The DST's first coefficient is zero by the paper's formula.
    """
    audio, squeeze = _batched(audio)
    spec = stft(audio)
    bank, dct, dst = _pccc_matrices(n_coeffs, str(audio.device))
    filtered = torch.complex(spec.real @ bank.T, spec.imag @ bank.T)
    log_mag = torch.log(filtered.abs().clamp_min(eps))
    phase = torch.angle(filtered)
    out = torch.cat([log_mag @ dct, phase @ dst], dim=-1)
    return out[0] if squeeze else out
