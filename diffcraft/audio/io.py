"""Read any soundfile-readable audio to mono float32 at 16 kHz; write wav.

Every problem with an input file raises AudioError naming the file and the problem, so a batch job
can skip the file, list the reason and go on.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from diffcraft import SAMPLE_RATE
from diffcraft.errors import AudioError

SILENCE_PEAK = 1e-4  # a file whose peak stays below this (-80 dBFS) is "all silent"
RESAMPLE_QUALITY = "VHQ"  # soxr's very-high-quality band-limited resampler


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a 1-D float signal (soxr VHQ)."""
    if rate_in == rate_out:
        return np.ascontiguousarray(audio, dtype=np.float32)
    return soxr.resample(np.asarray(audio, dtype=np.float32), rate_in, rate_out,
                         quality=RESAMPLE_QUALITY).astype(np.float32)


def validate_audio(audio: np.ndarray, path, min_samples: int = 1) -> np.ndarray:
    """Raise AudioError if `audio` (mono, 16 kHz) is unusable; return it unchanged otherwise."""
    if audio.size == 0:
        raise AudioError(path, "contains no samples")
    if not np.all(np.isfinite(audio)):
        bad = int(np.count_nonzero(~np.isfinite(audio)))
        raise AudioError(path, f"contains {bad} NaN or Inf samples")
    if float(np.max(np.abs(audio))) < SILENCE_PEAK:
        raise AudioError(path, f"is all silent (peak below {SILENCE_PEAK:g})")
    if audio.size < min_samples:
        raise AudioError(path, f"is {audio.size / SAMPLE_RATE:.2f} s long, shorter than the "
                               f"{min_samples / SAMPLE_RATE:.2f} s needed")
    return audio


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, min_samples: int = 1,
               data: bytes | None = None) -> np.ndarray:
    """Load `path` as mono float32 at `sample_rate`: [n_samples]. Channels are averaged.

    With `data`, the file's bytes are decoded instead (a Ray worker on another node gets the
    bytes, not the path); `path` then only names the file in errors.
    """
    if data is None:
        path = Path(path)
        if not path.is_file():
            raise AudioError(path, "no such file")
        data = path.read_bytes()
    if len(data) == 0:
        raise AudioError(path, "is an empty file (0 bytes)")
    try:
        data, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(path, f"is not readable audio ({err})") from None
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if mono.size and not np.all(np.isfinite(mono)):
        validate_audio(mono, path)  # name the NaN problem before resampling smears it
    audio = resample(mono, rate, sample_rate)
    return validate_audio(audio, path, min_samples)


def write_wav(path: str | Path, audio, sample_rate: int = SAMPLE_RATE, limit_peak: bool = False) -> Path:
    """Write mono float audio as 16-bit PCM wav, atomically (temp file, then rename). Samples
    beyond ±1 are clipped, or with `limit_peak` the whole signal is scaled down to peak at 1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if limit_peak and audio.size:
        audio = audio / max(1.0, float(np.abs(audio).max()))
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), np.clip(audio, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
    tmp.replace(path)
    return path
