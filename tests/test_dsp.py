import math

import numpy as np
import pytest
import torch

from diffcraft.dsp import core
from diffcraft.dsp.synths import Reverb
from diffcraft.losses import MultiScaleSpectralLoss

SR, HOP = 16000, 160


def peak_hz(audio: torch.Tensor) -> float:
    spectrum = np.abs(np.fft.rfft(audio.numpy() * np.hanning(len(audio)), n=16 * len(audio)))
    return float(np.argmax(spectrum) * SR / (16 * len(audio)))


def test_one_harmonic_at_constant_f0_peaks_at_f0_within_1hz():
    f0 = torch.full((1, 200), 437.3)
    amps = torch.full((1, 200, 1), 0.5)
    audio = core.harmonic_synthesis(f0, amps, HOP, SR)[0]
    assert audio.shape == (200 * HOP,)
    assert abs(peak_hz(audio[1000:-1000]) - 437.3) < 1.0
    assert abs(audio.abs().max().item() - 0.5) < 1e-3


def test_no_energy_above_nyquist_folds_back():
    """Harmonics of 3 kHz at 9, 12, 15 kHz would alias to 7, 4, 1 kHz if not removed."""
    f0 = torch.full((1, 100), 3000.0)
    audio = core.harmonic_synthesis(f0, torch.ones(1, 100, 5), HOP, SR)[0].numpy()
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    freqs = np.fft.rfftfreq(len(audio), 1 / SR)
    at = lambda hz: spectrum[np.abs(freqs - hz) < 30].max()
    assert at(3000) > 1000 * max(at(7000), at(4000), at(1000))
    assert at(6000) > 1000 * at(7000)


def test_normalize_harmonics_removes_harmonics_at_or_above_nyquist():
    dist = torch.ones(1, 1, 10)
    out = core.normalize_harmonics(dist, torch.tensor([[1000.0]]), SR)
    assert torch.all(out[0, 0, 7:] == 0) and torch.isclose(out.sum(), torch.tensor(1.0))


def test_fused_bank_equals_autograd_bank_in_value_and_gradient():
    torch.manual_seed(0)
    f0 = 150 + 600 * torch.rand(2, 30)
    amps = torch.rand(2, 30, 40)
    a = amps.clone().requires_grad_()
    b = amps.clone().requires_grad_()
    fused = core.harmonic_synthesis(f0, a, HOP, SR)
    plain = core.harmonic_synthesis(f0.clone().requires_grad_(), b, HOP, SR)
    assert torch.allclose(fused, plain, atol=2e-4)
    weights = torch.randn_like(fused)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=5e-4, rtol=1e-4)


def test_phase_does_not_drift_over_ten_minutes():
    f0 = torch.full((1, 60000), 440.0)  # 600 s at 100 frames/s
    samples = core.upsample_frames(f0[..., None], HOP)[..., 0]
    phase = core.accumulate_phase(samples, SR)
    n = torch.arange(samples.shape[-1], dtype=torch.float64) + 1
    exact = torch.remainder(2 * math.pi * 440.0 * n / SR, 2 * math.pi)
    error = torch.remainder(phase.double() - exact + math.pi, 2 * math.pi) - math.pi
    assert error.abs().max() < 1e-3


def test_upsampling_puts_frame_i_at_sample_i_times_hop_and_holds_the_last():
    frames = torch.tensor([[[0.0], [1.0], [3.0]]])
    up = core.upsample_frames(frames, 4)[0, :, 0]
    assert up.tolist() == [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3, 3, 3]
    window = core.upsample_frames(frames, 4, "window")[0, :, 0]
    assert window[0] == 0 and window[4] == 1 and window[8] == 3 and 0 < window[2] < 1


def test_filtered_noise_follows_its_band_magnitudes():
    torch.manual_seed(0)
    mags = torch.zeros(1, 400, 65)
    mags[..., :16] = 1.0  # pass below 2 kHz only
    noise = core.filtered_noise(mags, HOP)[0].numpy()
    spectrum = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise), 1 / SR)
    assert spectrum[freqs < 1500].mean() > 100 * spectrum[freqs > 3000].mean()
    assert noise.shape == (400 * HOP,)


def test_reverb_with_silent_ir_is_the_dry_signal_and_is_causal():
    reverb = Reverb(1600)
    audio = torch.zeros(1, 16000)
    audio[0, 8000] = 1.0
    with torch.no_grad():
        reverb.ir.zero_()
        assert torch.equal(reverb(audio), audio)
        reverb.ir.fill_(0.01)
        wet = reverb(audio)
    assert wet[0, :8000].abs().max() < 1e-6 and wet[0, 8001:9600].abs().min() > 0.009


def test_multiscale_spectral_loss_is_zero_for_identical_and_per_clip():
    loss = MultiScaleSpectralLoss()
    x = torch.randn(3, 16000)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-5)
    per = loss.per_example(x, x * torch.tensor([[1.0], [0.5], [0.1]]))
    assert per.shape == (3,) and per[0] < 1e-5 < per[1] < per[2]
