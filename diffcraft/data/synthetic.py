"""A synthetic violin-like instrument with exact F0 labels, deterministic by seed.

Phrases are random walks over a diatonic scale in the violin's range with legato (gliding) and
detached notes, rests, delayed vibrato and phrase-level dynamics. Each note is a bowed-string
harmonic spectrum (about 1/k) shaped by fixed body resonances, plus bow noise that follows the
bow pressure. The F0 is known per sample, so the labels are exact by construction.
`write_dataset` lays phrases out in the MDB-stem-synth format, so synthetic data goes through
exactly the code path of the real dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.signal
import yaml

from diffcraft.pitch import midi_to_hz

MAJOR_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])
BODY_RESONANCES_HZ = np.array([280.0, 460.0, 700.0, 1100.0, 2600.0])
BODY_GAINS_DB = np.array([9.0, 7.0, 5.0, 4.0, 8.0])
BODY_WIDTH_OCTAVES = np.array([0.25, 0.3, 0.35, 0.4, 0.6])
MDB_HOP = 128  # MDB-stem-synth annotations: one row per 128 samples at 44.1 kHz
INSTRUMENT = "synthetic violin"


@dataclass
class Phrase:
    """One rendered phrase: audio [n], f0_hz [n] (0 where unvoiced) at `sample_rate`."""
    audio: np.ndarray
    f0_hz: np.ndarray
    sample_rate: int


def _body_gain(freq_hz: np.ndarray) -> np.ndarray:
    """Linear amplitude gain of the violin body at each frequency."""
    octaves = np.log2(np.maximum(freq_hz, 1.0)[..., None] / BODY_RESONANCES_HZ)
    bumps = BODY_GAINS_DB * np.exp(-0.5 * (octaves / BODY_WIDTH_OCTAVES) ** 2)
    return 10 ** (bumps.sum(-1) / 20)


def _note_plan(rng: np.random.Generator, seconds: float) -> list[tuple[float, float, float, bool]]:
    """(start_s, duration_s, midi or nan for a rest, legato) events covering `seconds`."""
    tonic = 55 + int(rng.integers(0, 12))  # G3 .. F#4
    degree = int(rng.integers(0, 10))
    events, t = [], 0.0
    while t < seconds:
        if events and rng.random() < 0.15:
            duration = float(rng.uniform(0.12, 0.6))
            events.append((t, duration, float("nan"), False))
        else:
            degree = int(np.clip(degree + rng.integers(-3, 4), 0, 20))
            midi = tonic + 12 * (degree // 7) + MAJOR_SCALE[degree % 7]
            duration = float(rng.choice([0.15, 0.25, 0.4, 0.6, 0.9, 1.2]) * rng.uniform(0.85, 1.15))
            legato = bool(events) and not np.isnan(events[-1][2]) and rng.random() < 0.5
            events.append((t, duration, float(midi), legato))
        t += duration
    return events


def render_phrase(seed: int, seconds: float = 20.0, sample_rate: int = 44100,
                  n_harmonics: int = 40) -> Phrase:
    """Render one phrase; the same seed always gives the same samples."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    midi = np.full(n, np.nan)
    envelope = np.zeros(n)
    dynamics = 0.35 + 0.25 * np.sin(2 * np.pi * t / rng.uniform(4.0, 9.0) + rng.uniform(0, 2 * np.pi))
    vibrato_rate = rng.uniform(4.5, 6.5)
    vibrato_depth_cents = rng.uniform(15.0, 40.0)
    vibrato = np.zeros(n)
    previous = None
    for start, duration, note, legato in _note_plan(rng, seconds):
        i0, i1 = int(start * sample_rate), min(n, int((start + duration) * sample_rate))
        if i1 <= i0 or np.isnan(note):
            previous = None
            continue
        seg = np.arange(i1 - i0) / sample_rate
        pitch = np.full(i1 - i0, note)
        if legato and previous is not None:  # portamento from the previous note
            glide = min(len(seg), int(rng.uniform(0.03, 0.06) * sample_rate))
            pitch[:glide] = previous + (note - previous) * np.linspace(0, 1, glide)
        midi[i0:i1] = pitch
        onset = 0.005 if legato else rng.uniform(0.03, 0.08)
        release = rng.uniform(0.04, 0.1) if not legato else 0.02
        env = np.minimum(1.0, seg / onset) * np.clip((seg[-1] - seg) / release, 0.0, 1.0)
        envelope[i0:i1] = env * rng.uniform(0.8, 1.0)
        ramp = np.clip((seg - 0.2) / 0.3, 0.0, 1.0)  # vibrato starts after 200 ms
        vibrato[i0:i1] = ramp * vibrato_depth_cents / 100 * np.sin(2 * np.pi * vibrato_rate * seg)
        previous = note
    voiced = ~np.isnan(midi)
    f0 = np.where(voiced, midi_to_hz(np.nan_to_num(midi) + vibrato), 0.0)
    smooth = scipy.signal.lfilter([0.02], [1, -0.98], envelope * dynamics)  # ~1 ms bow smoothing
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate  # float64: no drift over long phrases
    audio = np.zeros(n)
    control = slice(None, None, 64)  # body response evaluated at a control rate, then held
    for k in range(1, n_harmonics + 1):
        freq = k * f0
        gain = np.repeat(_body_gain(freq[control]), 64)[:n] / k
        gain *= freq < 0.45 * sample_rate
        audio += gain * np.sin(k * phase)
    audio *= smooth
    noise = rng.standard_normal(n)
    b, a = scipy.signal.butter(2, [1500, min(7000, 0.45 * sample_rate)], btype="band", fs=sample_rate)
    audio += 0.04 * scipy.signal.lfilter(b, a, noise) * smooth
    audio *= 0.7 / max(np.abs(audio).max(), 1e-9)
    f0_hz = np.where(voiced & (envelope > 0.02), f0, 0.0)
    return Phrase(audio.astype(np.float32), f0_hz.astype(np.float32), sample_rate)


def write_dataset(out: str | Path, n_songs: int = 4, stems_per_song: int = 2,
                  seconds: float = 20.0, seed: int = 0, sample_rate: int = 44100) -> Path:
    """Write phrases in the MDB-stem-synth layout, with MedleyDB-style metadata per song.

    out/audio_stems/Synth_Song<i>_STEM_<j>.RESYN.wav, out/annotation_stems/....RESYN.csv
    (time_s,f0_hz every 128 samples, 0 = unvoiced), out/metadata/Song<i>_METADATA.yaml.
    """
    import soundfile as sf

    out = Path(out)
    (out / "audio_stems").mkdir(parents=True, exist_ok=True)
    (out / "annotation_stems").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for song in range(n_songs):
        song_name = f"Song{song:02d}"
        stems = {}
        for stem in range(1, stems_per_song + 1):
            phrase = render_phrase(seed * 1000 + song * 100 + stem, seconds, sample_rate)
            name = f"Synth_{song_name}_STEM_{stem:02d}.RESYN"
            sf.write(str(out / "audio_stems" / f"{name}.wav"), phrase.audio, sample_rate,
                     subtype="PCM_16")
            rows = np.arange(0, len(phrase.f0_hz), MDB_HOP)
            table = np.stack([rows / sample_rate, phrase.f0_hz[rows]], axis=1)
            np.savetxt(out / "annotation_stems" / f"{name}.csv", table, fmt="%.6f", delimiter=",")
            stems[f"S{stem:02d}"] = {"instrument": INSTRUMENT, "component": "melody"}
        meta = {"title": song_name, "artist": "Synth", "stems": stems}
        (out / "metadata" / f"Synth_{song_name}_METADATA.yaml").write_text(yaml.safe_dump(meta))
    return out
