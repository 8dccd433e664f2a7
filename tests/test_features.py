import numpy as np
import pytest
import torch

from diffcraft.audio import features
from tests.conftest import sine


@pytest.mark.parametrize("amplitude", [1.0, 0.5, 0.05])
def test_loudness_of_1khz_sine_is_its_rms_power_in_db(amplitude):
    loud = features.a_weighted_loudness(torch.from_numpy(sine(1000, 4.0, amplitude)))
    expected = 10 * np.log10(amplitude ** 2 / 2)
    assert abs(float(loud[20:380].mean()) - expected) < 0.1


def test_loudness_applies_a_weighting_and_floor():
    low = features.a_weighted_loudness(torch.from_numpy(sine(100, 4.0, 0.5)))[20:380].mean()
    mid = features.a_weighted_loudness(torch.from_numpy(sine(1000, 4.0, 0.5)))[20:380].mean()
    assert 17 < float(mid - low) < 21  # A-weighting is about -19.1 dB at 100 Hz
    silent = features.a_weighted_loudness(torch.zeros(64000))
    assert torch.all(silent == features.LOUDNESS_FLOOR_DB)


def test_every_feature_has_400_frames_per_clip():
    clip = torch.from_numpy(np.stack([sine(440, 4.0), sine(220, 4.0)]))
    assert features.a_weighted_loudness(clip).shape == (2, 400)
    assert features.log_magnitude_stft(clip).shape == (2, 400, 1025)
    assert features.pccc(clip).shape == (2, 400, 2 * features.PCCC_COEFFS)
    assert features.n_frames(64000) == 400


def test_piano_filterbank_has_no_empty_or_duplicate_filter():
    bank = features.piano_filterbank()
    assert bank.shape == (88, 1025)
    assert (bank > 0).sum(axis=1).min() >= 2
    assert np.allclose(bank.sum(axis=1), 1.0, atol=1e-5)
    differences = np.abs(bank[:, None, :] - bank[None, :, :]).max(axis=2)
    np.fill_diagonal(differences, 1.0)
    assert differences.min() > 1e-3


def test_piano_filterbank_without_minimum_width_would_have_empty_filters():
    with pytest.raises(ValueError, match="hold no FFT bin"):
        features.piano_filterbank(min_width_bins=0.0)


def test_pccc_separates_pitches_and_is_finite():
    a = features.pccc(torch.from_numpy(sine(220, 1.0)))
    b = features.pccc(torch.from_numpy(sine(660, 1.0)))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a[20:80].mean(0) - b[20:80].mean(0)).abs().max() > 1.0


def test_loudness_of_a_batch_has_one_row_per_clip_and_equal_rows_for_equal_clips():
    """CPU only: whether features stay on a GPU input's device is not checked here."""
    clip = torch.from_numpy(sine(440, 1.0))[None].repeat(3, 1)
    out = features.a_weighted_loudness(clip)
    assert out.device == clip.device and out.shape == (3, 100)
    assert torch.allclose(out[0], out[2])
