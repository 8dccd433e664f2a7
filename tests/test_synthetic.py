import numpy as np

from diffcraft.audio.crepe import crepe_pitch
from diffcraft.pitch import hz_to_cents
from diffcraft.audio.io import resample
from diffcraft.data.synthetic import render_phrase


def test_phrase_is_deterministic_by_seed():
    a, b, c = render_phrase(3, 3.0), render_phrase(3, 3.0), render_phrase(4, 3.0)
    assert np.array_equal(a.audio, b.audio) and np.array_equal(a.f0_hz, b.f0_hz)
    assert not np.array_equal(a.audio, c.audio)


def test_phrase_has_notes_rests_and_vibrato():
    phrase = render_phrase(11, 20.0, sample_rate=16000)
    voiced = phrase.f0_hz > 0
    assert 0.5 < voiced.mean() < 0.99  # rests and note gaps exist
    cents = hz_to_cents(phrase.f0_hz[voiced])
    assert cents.max() - cents.min() > 300  # more than one note
    assert np.abs(phrase.audio).max() <= 0.71


def test_synthetic_labels_match_crepe_estimate_of_its_own_audio():
    phrase = render_phrase(5, 8.0, sample_rate=44100)
    audio = resample(phrase.audio, 44100)
    f0, periodicity = crepe_pitch(audio, "tiny", progress=False)
    label = phrase.f0_hz[::441][: len(f0)]  # the label at each 10 ms frame centre
    frames = (label > 0) & (periodicity > 0.5)
    assert frames.mean() > 0.5
    error = np.abs(hz_to_cents(f0[frames]) - hz_to_cents(label[frames]))
    assert np.median(error) < 25
    assert np.mean(error < 50) > 0.9
