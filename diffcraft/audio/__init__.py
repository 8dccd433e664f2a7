"""Audio in and out, frame features (loudness, STFT, PCCC) and CREPE pitch labels."""
from diffcraft.audio.io import load_audio, resample, validate_audio, write_wav

__all__ = ["load_audio", "resample", "validate_audio", "write_wav"]
