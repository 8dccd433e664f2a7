import numpy as np
import pytest
import soundfile as sf

from diffcraft.audio.io import load_audio, write_wav
from diffcraft.errors import AudioError
from tests.conftest import sine


@pytest.mark.parametrize("fmt,subtype,rate,channels", [
    ("WAV", "PCM_16", 44100, 2), ("WAV", "PCM_24", 48000, 1), ("WAV", "FLOAT", 22050, 1),
    ("FLAC", "PCM_16", 32000, 2), ("OGG", "VORBIS", 44100, 1), ("AIFF", "PCM_16", 8000, 1),
])
def test_any_format_rate_and_channels_load_as_mono_16k(tmp_path, fmt, subtype, rate, channels):
    tone = sine(440, 1.0, 0.5, rate)
    data = np.stack([tone] * channels, axis=1) if channels > 1 else tone
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(str(path), data, rate, subtype=subtype, format=fmt)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(audio[2000:14000] * np.hanning(12000)))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 3
    assert 0.4 < np.abs(audio[2000:14000]).max() < 0.6


def test_write_wav_round_trips(tmp_path):
    tone = sine(220, 0.5)
    path = write_wav(tmp_path / "out" / "tone.wav", tone)
    back = load_audio(path)
    assert np.max(np.abs(back - tone)) < 1e-3
    assert not list((tmp_path / "out").glob(".*.tmp"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,message", [
    ("empty", "empty file"), ("garbage", "not readable audio"), ("text", "not readable audio"),
    ("nan", "NaN or Inf"), ("silent", "all silent"), ("short", "shorter than"), ("missing", "no such file"),
])
def test_bad_input_raises_audio_error_naming_file_and_problem(tmp_path, case, message):
    path = tmp_path / f"{case}.wav"
    if case == "empty":
        _write(path, b"")
    elif case == "garbage":
        _write(path, np.random.default_rng(0).bytes(5000))
    elif case == "text":
        path = _write(tmp_path / "notes.txt", b"this is not audio\n" * 50)
    elif case == "nan":
        data = sine(440, 1.0)
        data[100] = np.nan
        sf.write(str(path), data, 16000, subtype="FLOAT")
    elif case == "silent":
        sf.write(str(path), np.zeros(16000, np.float32), 16000)
    elif case == "short":
        sf.write(str(path), sine(440, 1.0), 16000)
    with pytest.raises(AudioError) as info:
        load_audio(path, min_samples=64000 if case == "short" else 1)
    assert str(path) in str(info.value) and message in str(info.value)
