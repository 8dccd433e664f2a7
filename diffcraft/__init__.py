"""diffcraft: DiffCraft (VAE audio encoder + Mamba DDSP decoder) studies on Ray, logged to MLflow."""
from diffcraft.errors import AudioError, CheckpointError, ConfigError, DataError, DiffcraftError

__version__ = "0.1.0"

SAMPLE_RATE = 16000  # Hz, every signal inside diffcraft
HOP_LENGTH = 160  # samples per frame: 10 ms, 100 frames per second
CLIP_SECONDS = 4.0
CLIP_SAMPLES = 64000
CLIP_FRAMES = 400

__all__ = ["AudioError", "CheckpointError", "ConfigError", "DataError", "DiffcraftError",
           "SAMPLE_RATE", "HOP_LENGTH", "CLIP_SECONDS", "CLIP_SAMPLES", "CLIP_FRAMES", "__version__"]
