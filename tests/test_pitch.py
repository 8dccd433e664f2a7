import math

import numpy as np
import pytest
import torch

from diffcraft import pitch


def test_cents_are_relative_to_10_hz_and_round_trip_for_tensors_and_arrays():
    assert pitch.hz_to_cents(10.0) == 0.0 and pitch.hz_to_cents(20.0) == pytest.approx(1200.0)
    hz = [27.5, 311.13, 440.0, 4186.01]
    cents = pitch.hz_to_cents(torch.tensor(hz))
    assert cents.dtype == torch.float32
    assert pitch.cents_to_hz(cents).tolist() == pytest.approx(hz, rel=1e-6)
    back = pitch.cents_to_hz(pitch.hz_to_cents(np.array(hz)))
    assert isinstance(back, np.ndarray) and back == pytest.approx(hz, rel=1e-12)


def test_midi_numbers_name_piano_keys_and_round_trip():
    assert pitch.midi_to_hz(69) == 440.0
    assert pitch.midi_to_hz(pitch.A0_MIDI) == pitch.A0_HZ == 27.5
    assert pitch.midi_to_hz(pitch.C8_MIDI) == pytest.approx(4186.009, abs=1e-3)
    keys = torch.arange(21.0, 109.0)
    assert pitch.hz_to_midi(pitch.midi_to_hz(keys)).tolist() == pytest.approx(keys.tolist(), abs=1e-4)
    assert pitch.hz_to_midi(np.array([220.0, 880.0])) == pytest.approx([57.0, 81.0])


def test_f0_bins_span_a0_to_c8_in_435_cells_of_20_cents():
    centres = pitch.bin_centres_cents()
    assert centres.shape == (435,)
    lower_edge, upper_edge = centres[0] - 10, centres[-1] + 10
    assert lower_edge.item() == pytest.approx(1200 * math.log2(27.5 / 10), abs=1e-3)
    assert upper_edge.item() == pytest.approx(1200 * math.log2(4186.009 / 10), abs=1e-2)
    assert 10 * 2 ** (centres[0].item() / 1200) == pytest.approx(27.66, abs=0.01)


def test_grid_edges_are_the_lowest_and_highest_piano_keys():
    a0, c8 = (pitch.hz_to_cents(pitch.midi_to_hz(key)) for key in (pitch.A0_MIDI, pitch.C8_MIDI))
    assert pitch.A0_CENTS == pytest.approx(a0, abs=1e-9)
    assert pitch.A0_CENTS + pitch.N_BINS * pitch.CENTS_PER_BIN == pytest.approx(c8, abs=1e-9)


@pytest.mark.parametrize("k", [0, 1, 217, 433, 434])
def test_blurred_target_peaks_at_the_true_bin(k):
    centre = pitch.bin_centres_cents()[k].item()
    target = pitch.blurred_targets(torch.tensor([pitch.cents_to_hz(centre + 7.0)]))[0]
    assert target.argmax().item() == k
    on_centre = pitch.blurred_targets(torch.tensor([pitch.cents_to_hz(centre)]))[0]
    assert on_centre[k].item() == pytest.approx(1.0, abs=1e-4)
    neighbour = math.exp(-0.5 * (pitch.CENTS_PER_BIN / pitch.TARGET_SIGMA_CENTS) ** 2)
    beside = k - 1 if k else k + 1
    assert on_centre[beside].item() == pytest.approx(neighbour, abs=1e-3)


@pytest.mark.parametrize("f0", [27.8, 65.4, 196.0, 440.0, 1234.5, 4100.0])
def test_a_pure_tone_target_decodes_within_20_cents(f0):
    probs = pitch.blurred_targets(torch.tensor([f0]))
    decoded = pitch.decode_f0(probs).item()
    assert abs(1200 * math.log2(decoded / f0)) < 20


def test_decoding_blurred_targets_recovers_f0_within_5_cents_inside_the_range():
    f0 = pitch.midi_to_hz(torch.linspace(23.0, 106.0, 2001, dtype=torch.float64)).float()
    decoded = pitch.decode_f0(pitch.blurred_targets(f0))
    assert pitch.cents_error(decoded, f0).abs().max().item() < 5.0


def test_decoding_ignores_mass_an_octave_away_from_the_peak():
    centres = pitch.bin_centres_cents()
    probs = torch.zeros(pitch.N_BINS)
    probs[100] = 0.6
    probs[160] = 0.4  # one octave (60 bins) up: outside the 4-bin window
    decoded = pitch.decode_f0(probs).item()
    assert pitch.hz_to_cents(decoded) == pytest.approx(centres[100].item(), abs=1e-2)


def test_all_bin_decoding_is_dragged_toward_octave_mass_that_local_decoding_ignores():
    centres = pitch.bin_centres_cents()
    probs = torch.zeros(pitch.N_BINS)
    probs[100] = 0.6
    probs[160] = 0.4  # an octave (1200 cents) above the peak
    local = pitch.hz_to_cents(pitch.decode_f0(probs)).item()
    everywhere = pitch.hz_to_cents(pitch.decode_f0(probs, window=None)).item()
    assert local == pytest.approx(centres[100].item(), abs=1e-2)
    assert everywhere == pytest.approx(centres[100].item() + 0.4 * 1200, abs=1e-2)  # between the notes


@pytest.mark.parametrize("f0", [65.4, 440.0, 2000.0])
def test_local_and_all_bin_decodings_agree_on_a_single_peak(f0):
    probs = pitch.blurred_targets(torch.tensor([f0]))
    probs = probs / probs.sum(-1, keepdim=True)
    local, everywhere = pitch.decode_f0(probs), pitch.decode_f0(probs, window=None)
    assert abs(pitch.cents_error(everywhere, local).item()) < 0.1


def test_the_encoders_f0_decoding_option_picks_the_window():
    from diffcraft.models.encoders import AudioEncoder, EncoderConfig

    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig(core="gru", width=8, latent_size=2, head_width=8))
    z = torch.randn(1, 5, 2)
    probs = torch.softmax(encoder.f0_decoder(z), -1)
    for option, window in (("local", pitch.DECODE_WINDOW_BINS), ("all", None)):
        encoder.cfg.f0_decoding = option
        assert torch.equal(encoder.decode(z, z)["f0_hz"], pitch.decode_f0(probs, window)), option


def test_cents_error_is_signed_and_folding_forgives_octaves():
    assert pitch.cents_error(torch.tensor(880.0), torch.tensor(440.0)).item() == pytest.approx(1200.0)
    assert pitch.cents_error(torch.tensor(440.0), torch.tensor(880.0)).item() == pytest.approx(-1200.0)
    folded = pitch.fold_octaves(torch.tensor([1200.0, -2400.0, -1150.0, 30.0]))
    assert folded.tolist() == pytest.approx([0.0, 0.0, 50.0, 30.0])


def test_pitch_accuracies_count_cents_and_forgive_octaves_in_chroma():
    true = torch.tensor([100.0, 200.0, 300.0, 400.0])
    pred = torch.tensor([101.0, 400.0, 300.0 * 2 ** (60 / 1200), 400.0])
    voiced = torch.tensor([True, True, True, False])
    assert pitch.raw_pitch_accuracy(pred, true, voiced) == pytest.approx(1 / 3)
    assert pitch.raw_chroma_accuracy(pred, true, voiced) == pytest.approx(2 / 3)


def test_pitch_accuracies_are_nan_without_voiced_frames():
    f0 = torch.tensor([200.0, 300.0])
    none = torch.tensor([False, False])
    assert math.isnan(pitch.raw_pitch_accuracy(f0, f0, none))
    assert math.isnan(pitch.raw_chroma_accuracy(f0, f0, none))
