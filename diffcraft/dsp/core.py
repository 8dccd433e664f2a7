"""Differentiable DSP as plain tensor functions: scaling, frame-to-sample upsampling, the harmonic
oscillator bank, time-varying FIR filtering of noise, and FFT convolution.

Shapes are batch first: frame signals [batch, n_frames, channels], audio [batch, n_samples].
Frame i sits at sample i * hop (centred frames), and the last frame is held over the final hop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TWO_PI = 2.0 * math.pi


def exp_sigmoid(x: torch.Tensor, exponent: float = 10.0, max_value: float = 2.0,
                threshold: float = 1e-7) -> torch.Tensor:
    """DDSP's positive scaling for amplitudes: max_value * sigmoid(x) ** ln(exponent) + threshold."""
    return max_value * torch.sigmoid(x) ** math.log(exponent) + threshold


def _ramp(hop: int, method: str, like: torch.Tensor) -> torch.Tensor:
    """Weight of the next frame at each of the hop samples between two frames."""
    r = torch.arange(hop, device=like.device, dtype=like.dtype) / hop
    if method == "linear":
        return r
    if method == "window":  # overlap-added Hann windows at 50 % = a raised-cosine cross-fade
        return torch.sin(0.5 * math.pi * r) ** 2
    raise ValueError(f"upsampling method {method!r} is not 'linear' or 'window'")


def upsample_frames(frames: torch.Tensor, hop: int, method: str = "linear") -> torch.Tensor:
    """[batch, n_frames, channels] -> [batch, n_frames * hop, channels]."""
    nxt = torch.cat([frames[:, 1:], frames[:, -1:]], dim=1)
    ramp = _ramp(hop, method, frames)[None, None, :, None]
    out = frames[:, :, None, :] + (nxt - frames)[:, :, None, :] * ramp
    return out.reshape(frames.shape[0], -1, frames.shape[-1])


def harmonic_frequencies(f0_hz: torch.Tensor, n_harmonics: int) -> torch.Tensor:
    """[batch, n_frames] -> [batch, n_frames, n_harmonics]: k * f0 for k = 1..n_harmonics."""
    k = torch.arange(1, n_harmonics + 1, device=f0_hz.device, dtype=f0_hz.dtype)
    return f0_hz[..., None] * k


def normalize_harmonics(distribution: torch.Tensor, f0_hz: torch.Tensor,
                        sample_rate: int) -> torch.Tensor:
    """Zero the harmonics at or above Nyquist and renormalise the rest to sum to 1 per frame.

    distribution: [batch, n_frames, n_harmonics], f0_hz: [batch, n_frames]
    """
    below = harmonic_frequencies(f0_hz, distribution.shape[-1]) < sample_rate / 2
    distribution = distribution * below
    return distribution / distribution.sum(-1, keepdim=True).clamp_min(1e-7)


def accumulate_phase(f0_hz: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Instantaneous phase in [0, 2 pi) of per-sample f0 [batch, n_samples].

    The running sum is taken in float64 and wrapped: a float32 cumsum drifts by whole cycles of
    error over minutes of audio.
    """
    omega = f0_hz.double() * (TWO_PI / sample_rate)
    return torch.remainder(torch.cumsum(omega, dim=-1), TWO_PI).to(f0_hz.dtype)


def _harmonic_sines(phase: torch.Tensor, f0: torch.Tensor, n_harmonics: int,
                    sample_rate: int) -> torch.Tensor:
    """sin(k * phase), zeroed where k * f0 >= Nyquist: [..., n_harmonics]."""
    k = torch.arange(1, n_harmonics + 1, device=phase.device, dtype=phase.dtype)
    sines = torch.sin(phase[..., None] * k)
    return sines * (f0[..., None] * k < sample_rate / 2)


class _FusedHarmonicBank(torch.autograd.Function):
    """CPU harmonic bank on the fused numba kernels (dsp.kernels); gradient for amplitudes only."""

    @staticmethod
    def forward(ctx, amplitudes, phase, f0, hop, sample_rate):
        from diffcraft.dsp import kernels
        from diffcraft.numba_support import as_numpy, use_torch_threads

        use_torch_threads()
        out = kernels.harmonic_forward(*(as_numpy(t) for t in (amplitudes, phase, f0)), hop,
                                       sample_rate / 2)
        ctx.save_for_backward(phase, f0)
        ctx.config = (hop, sample_rate, amplitudes.shape[-1])
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        from diffcraft.dsp import kernels
        from diffcraft.numba_support import as_numpy, use_torch_threads

        phase, f0 = ctx.saved_tensors
        hop, sample_rate, n_harmonics = ctx.config
        use_torch_threads()
        grad = kernels.harmonic_backward(*(as_numpy(t) for t in (grad_out, phase, f0)), n_harmonics,
                                         hop, sample_rate / 2)
        return torch.from_numpy(grad), None, None, None, None


def harmonic_synthesis(f0_hz: torch.Tensor, amplitudes: torch.Tensor, hop: int,
                       sample_rate: int) -> torch.Tensor:
    """Additive synthesis of harmonics of f0.

    f0_hz: [batch, n_frames]; amplitudes: [batch, n_frames, n_harmonics] (per harmonic, linear)
    -> audio [batch, n_frames * hop]. Frequencies and amplitudes are linearly interpolated between
    frames; a harmonic is silent on every sample where it reaches Nyquist. On CPU float32 with no
    gradient needed for f0, the fused kernels run; otherwise plain autograd runs the same math
    (it stores the full per-sample tensors, fine on a GPU).
    """
    f0_samples = upsample_frames(f0_hz[..., None], hop, "linear")[..., 0]
    phase = accumulate_phase(f0_samples.detach(), sample_rate)
    fused = (amplitudes.device.type == "cpu" and amplitudes.dtype == torch.float32
             and not f0_hz.requires_grad)
    if fused:
        return _FusedHarmonicBank.apply(amplitudes, phase, f0_samples.detach(), hop, sample_rate)
    cumulative = torch.cumsum(f0_samples * (TWO_PI / sample_rate), -1)
    phase = phase + (cumulative - cumulative.detach())  # float64 phase values, differentiable in f0
    sines = _harmonic_sines(phase, f0_samples, amplitudes.shape[-1], sample_rate)
    return (sines * upsample_frames(amplitudes, hop, "linear")).sum(-1)


# ---------------------------------------------------------------- filtering and convolution

def frequency_impulse_response(magnitudes: torch.Tensor) -> torch.Tensor:
    """Linear-phase FIR per frame from band magnitudes (0 .. Nyquist, zero phase).

    magnitudes: [batch, n_frames, n_bands] -> [batch, n_frames, 2 * (n_bands - 1)]: the inverse
    rFFT, Hann-windowed and shifted to be causal; its group delay is n_bands - 1 samples.
    """
    ir = torch.fft.irfft(magnitudes.to(torch.complex64), dim=-1)
    size = ir.shape[-1]
    window = torch.hann_window(size, device=ir.device, dtype=ir.dtype)
    return torch.roll(ir, size // 2, dims=-1) * window


def time_varying_fir(audio: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
    """Filter each hop of `audio` [batch, n_frames * hop] with its frame's FIR [batch, n_frames, taps],
    overlap-adding the tails, compensating the linear-phase delay of taps // 2 samples."""
    batch, n_frames, taps = ir.shape
    hop = audio.shape[-1] // n_frames
    n_fft = 1 << (hop + taps - 2).bit_length()
    blocks = audio.reshape(batch, n_frames, hop)
    out = torch.fft.irfft(torch.fft.rfft(blocks, n_fft) * torch.fft.rfft(ir, n_fft), n_fft)
    length = (n_frames - 1) * hop + n_fft
    out = F.fold(out.transpose(1, 2), output_size=(1, length), kernel_size=(1, n_fft),
                 stride=(1, hop)).reshape(batch, length)
    delay = taps // 2
    return out[:, delay: delay + n_frames * hop]


def filtered_noise(magnitudes: torch.Tensor, hop: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform white noise in [-1, 1] shaped per frame by band magnitudes [batch, n_frames, n_bands]."""
    batch, n_frames, _ = magnitudes.shape
    noise = torch.rand(batch, n_frames * hop, device=magnitudes.device, dtype=magnitudes.dtype,
                       generator=generator) * 2 - 1
    return time_varying_fir(noise, frequency_impulse_response(magnitudes))


def fft_convolve(audio: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
    """Causal linear convolution of audio [batch, n] with one ir [taps] (or [batch, taps]),
    truncated to n samples."""
    n = audio.shape[-1]
    n_fft = 1 << (n + ir.shape[-1] - 2).bit_length()
    out = torch.fft.irfft(torch.fft.rfft(audio, n_fft) * torch.fft.rfft(ir, n_fft), n_fft)
    return out[..., :n]


def fill_unvoiced(f0_hz: torch.Tensor) -> torch.Tensor:
    """Replace unvoiced frames (f0 <= 0) by the last voiced f0 (the first, before any), so the
    oscillators never glide to 0 Hz across a rest. f0_hz: [batch, frames]."""
    voiced = f0_hz > 0
    frames = torch.arange(f0_hz.shape[-1], device=f0_hz.device).expand_as(f0_hz)
    last = torch.where(voiced, frames, torch.zeros_like(frames)).cummax(-1).values
    first = torch.where(voiced, frames, torch.full_like(frames, f0_hz.shape[-1] - 1)).min(-1, keepdim=True).values
    index = torch.where(voiced.cumsum(-1) > 0, last, first.expand_as(frames))
    return torch.gather(f0_hz, -1, index)
