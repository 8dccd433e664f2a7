"""Timbre transfer: F0 and loudness from any audio, played by a trained instrument.

F0 and loudness come from the model's own encoder (`f0_source="encoder"`) or from CREPE and
the A-weighted loudness (`"crepe"`, the only choice for a decoder-only model). An optional pitch
shift (semitones) and loudness offset (dB) are applied before the DDSP decoder synthesises.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.audio.crepe import crepe_pitch
from diffcraft.audio.features import a_weighted_loudness
from diffcraft.errors import ConfigError
from diffcraft.models.autoencoder import DiffCraft
from diffcraft.models.decoder import split_head

F0_SOURCES = ("encoder", "crepe")


@dataclass
class Transferred:
    audio: np.ndarray  # [samples] at 16 kHz
    f0_hz: np.ndarray  # [frames], after the pitch shift
    loudness_db: np.ndarray  # [frames], after the offset


CHUNK_FRAMES = 3000  # 30 s of frames through the networks at a time
CONTEXT_FRAMES = 200  # 2 s of context either side of a chunk, cut off afterwards


def chunked_frames(fn, n_frames: int, chunk: int | None = None, context: int | None = None):
    """Run `fn(start, stop)` -> tensor [frames, ...] over overlapping windows of frames and join the
    middles: each chunk sees `context` frames of its neighbours, so recurrent and bidirectional
    cores have what they need at the joins, and memory stays bounded for long files."""
    chunk = chunk or CHUNK_FRAMES
    context = CONTEXT_FRAMES if context is None else context
    parts = []
    for start in range(0, n_frames, chunk):
        stop = min(n_frames, start + chunk)
        lo, hi = max(0, start - context), min(n_frames, stop + context)
        parts.append(fn(lo, hi)[start - lo: start - lo + stop - start])
    return torch.cat(parts, dim=0)


def source_controls(model: DiffCraft, audio: torch.Tensor, f0_source: str = "encoder",
                    crepe_model: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """(f0_hz, loudness_db) [frames] of 16 kHz audio [samples] (a whole number of hops)."""
    if f0_source not in F0_SOURCES:
        raise ConfigError(f"f0 source {f0_source!r} is not one of {list(F0_SOURCES)}")
    n_frames = audio.shape[0] // HOP_LENGTH
    if f0_source == "encoder":
        if model.encoder is None:
            raise ConfigError("this model has no encoder (decoder stage): use the crepe F0 source")

        def encode(lo, hi):
            out = model.encoder(audio[lo * HOP_LENGTH: hi * HOP_LENGTH][None])
            return torch.stack([out["f0_hz"][0], out["loudness_db"][0]], -1)

        both = chunked_frames(encode, n_frames)
        return both[:, 0], both[:, 1]
    f0, _ = crepe_pitch(audio.cpu().numpy(), crepe_model, progress=False)
    margin = 8  # frames of audio either side: every STFT frame sees exactly its own samples
    loudness = chunked_frames(lambda lo, hi: a_weighted_loudness(audio[lo * HOP_LENGTH: hi * HOP_LENGTH]),
                              n_frames, context=margin)
    return torch.from_numpy(f0).to(audio.device), loudness


@torch.no_grad()
def timbre_transfer(model: DiffCraft, audio, f0_source: str = "encoder", pitch_shift: float = 0.0,
                    loudness_offset: float = 0.0, crepe_model: str = "full") -> Transferred:
    """Synthesise `audio` (16 kHz mono, any length) with the model's instrument. The networks run
    over overlapping chunks; the synthesiser runs once over the whole file, so the oscillators'
    phase and the noise filter run on across the joins."""
    from diffcraft.dsp.core import fill_unvoiced

    if model.decoder is None:
        raise ConfigError("this model has no DDSP decoder (encoder stage): it cannot synthesise")
    model.eval()
    device = next(model.parameters()).device
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=device).reshape(-1)
    n = audio.shape[0]
    padded = torch.nn.functional.pad(audio, (0, (-n) % HOP_LENGTH))
    f0_hz, loudness_db = source_controls(model, padded, f0_source, crepe_model)
    f0_hz = fill_unvoiced((f0_hz * 2.0 ** (pitch_shift / 12.0))[None])[0]
    loudness_db = loudness_db + loudness_offset
    decoder = model.decoder
    layout = decoder.cfg.head_layout()

    def controls(lo, hi):
        raw = decoder.controls(f0_hz[None, lo:hi], loudness_db[None, lo:hi])
        return torch.cat([raw[k][0].float() for k in layout], -1)

    raw = split_head(chunked_frames(controls, f0_hz.shape[0])[None], layout)
    out = decoder.synthesize(f0_hz[None], raw)["audio"][0, :n]
    return Transferred(out.cpu().numpy(), f0_hz.cpu().numpy(), loudness_db.cpu().numpy())


def resolve_f0_source(model: DiffCraft, f0_source: str) -> str:
    """`auto` is the model's own encoder when it has one, else CREPE."""
    if f0_source == "auto":
        return "encoder" if model.encoder is not None else "crepe"
    return f0_source


def transfer_files(inputs: list[Path], model: DiffCraft, out_dir: Path, f0_source: str = "auto",
                   pitch_shift: float = 0.0, loudness_offset: float = 0.0, crepe_model: str = "full",
                   plot: bool = False) -> tuple[list[str], list[str]]:
    """Transfer each input file into out_dir/<name>_transfer.wav (and a PNG with `plot`).
    Returns (one line per written file with its real-time factor, one error per skipped file):
    a bad file is reported by name and the others go on."""
    import time

    from diffcraft.audio.io import load_audio, write_wav
    from diffcraft.errors import AudioError

    source = resolve_f0_source(model, f0_source)
    out_dir.mkdir(parents=True, exist_ok=True)
    done, errors = [], []
    for path in inputs:
        try:
            audio = load_audio(path)
        except AudioError as err:
            errors.append(str(err))
            continue
        started = time.perf_counter()
        out = timbre_transfer(model, audio, source, pitch_shift, loudness_offset, crepe_model)
        seconds = time.perf_counter() - started
        target = write_wav(out_dir / f"{Path(path).stem}_transfer.wav", out.audio, limit_peak=True)
        duration = len(audio) / SAMPLE_RATE
        line = (f"{path} -> {target}  ({duration:.1f} s of audio in {seconds:.1f} s, "
                f"real-time factor {seconds / duration:.3f}, F0 from {source})")
        if plot:
            from diffcraft.plots import spectrogram_figure

            figure = spectrogram_figure(out_dir / f"{Path(path).stem}_transfer.png", audio, out.audio, out.f0_hz,
                                        f"{Path(path).name}: input with the F0 used (after any pitch shift), and transfer",
                                        ("input", "transfer"))
            line += f", plot {figure}"
        done.append(line)
    return done, errors
