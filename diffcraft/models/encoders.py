"""The audio encoder: frame features -> sequence core -> per-frame latents -> F0 and loudness.

Feature front-ends (one frame per 10 ms, 400 per clip):
  waveform  the clip as 400 snippets of 160 samples
  stft      log-magnitude STFT (n_fft 2048, Hann 512): 1025 bins
  pccc      Piano Complex Cepstral Coefficients: 88 values
Encodings:
  dual      waveform and STFT encoders, outputs concatenated, one latent read by both decoders
  separate  PCCC encoder -> F0 latent -> F0 decoder; waveform encoder -> loudness latent -> loudness decoder
Latents are per frame, `deterministic` (a plain autoencoder: the paper's "differential") or `vae`
(mean and log-variance, reparameterised while training, the mean at evaluation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from diffcraft import HOP_LENGTH, pitch
from diffcraft.audio.features import PCCC_COEFFS, log_magnitude_stft, pccc, unscale_loudness
from diffcraft.errors import ConfigError
from diffcraft.nn.cores import CoreName, make_core

LOGVAR_RANGE = (-12.0, 6.0)


@dataclass
class EncoderConfig:
    encoding: Literal["dual", "separate"] = "separate"
    latent: Literal["deterministic", "vae"] = "deterministic"
    core: CoreName = "mamba"  # sequence core of each feature encoder
    width: int = 256  # embedding and core width of each feature encoder
    core_layers: int = 1
    latent_size: int = 16  # per frame, per latent
    head_width: int = 256  # hidden width of the F0 and loudness decoders
    f0_decoding: Literal["local", "all"] = "local"  # F0: weighted mean of the bins near the peak or of all

    def validate(self, where: str = "") -> None:
        p = f"{where}." if where else ""
        for name in ("width", "core_layers", "latent_size", "head_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: {getattr(self, name)} must be at least 1")


F0_DECODING_WINDOWS = {  # f0_decoding -> bins either side of the peak that the weighted mean reads
    "local": pitch.DECODE_WINDOW_BINS,  # CREPE's: mass on a far octave does not drag F0 between notes
    "all": None,  # the paper's: every bin
}

FEATURES = {  # name -> (features per frame, extractor [batch, samples] -> [batch, frames, size])
    "waveform": (HOP_LENGTH, lambda audio: audio.reshape(audio.shape[0], -1, HOP_LENGTH)),
    "stft": (1025, log_magnitude_stft),
    "pccc": (2 * PCCC_COEFFS, pccc),
}


class FeatureEncoder(nn.Module):
    """One front-end: features -> Linear embedding -> sequence core: [batch, frames, width]."""

    def __init__(self, feature: str, cfg: EncoderConfig):
        super().__init__()
        self.feature = feature
        size, self.extract = FEATURES[feature]
        self.embed = nn.Linear(size, cfg.width)
        self.core = make_core(cfg.core, cfg.width, cfg.width, cfg.core_layers)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        with torch.autocast(audio.device.type, enabled=False):
            features = self.extract(audio.float())
        return self.core(self.embed(features))


class LatentHead(nn.Module):
    """Per-frame latent: z = W h (deterministic) or z ~ N(mu, sigma^2) with mu, log sigma^2 = W h."""

    def __init__(self, input_size: int, latent_size: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(input_size, latent_size * (2 if kind == "vae" else 1))

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.proj(hidden)
        if self.kind != "vae":
            return {"z": out, "mu": out}
        mu, logvar = out.chunk(2, dim=-1)
        logvar = logvar.clamp(*LOGVAR_RANGE)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"z": z, "mu": mu, "logvar": logvar}


def dense_tanh(input_size: int, hidden: int, output_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(input_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, output_size))


class F0Decoder(nn.Module):
    """Latent -> logits over the 435 pitch bins (a softmax distribution over pitch)."""

    def __init__(self, latent_size: int, hidden: int):
        super().__init__()
        self.net = dense_tanh(latent_size, hidden, pitch.N_BINS)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LoudnessDecoder(nn.Module):
    """Latent -> loudness in dB (the network predicts the [0, 1] scaled value)."""

    def __init__(self, latent_size: int, hidden: int):
        super().__init__()
        self.net = dense_tanh(latent_size, hidden, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return unscale_loudness(self.net(z)[..., 0])


LATENT_HEADS = {"dual": ("shared",), "separate": ("f0", "loudness")}  # the latent heads of each encoding


class AudioEncoder(nn.Module):
    """audio [batch, samples] -> {'f0_logits', 'f0_hz', 'loudness_db', 'latents': {name: head output}}."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.encoding == "dual":
            self.branches = nn.ModuleDict({"waveform": FeatureEncoder("waveform", cfg),
                                           "stft": FeatureEncoder("stft", cfg)})
        else:
            self.branches = nn.ModuleDict({"pccc": FeatureEncoder("pccc", cfg),
                                           "waveform": FeatureEncoder("waveform", cfg)})
        head_in = 2 * cfg.width if cfg.encoding == "dual" else cfg.width  # dual: both branches feed one head
        self.heads = nn.ModuleDict({name: LatentHead(head_in, cfg.latent_size, cfg.latent)
                                    for name in LATENT_HEADS[cfg.encoding]})
        self.f0_decoder = F0Decoder(cfg.latent_size, cfg.head_width)
        self.loudness_decoder = LoudnessDecoder(cfg.latent_size, cfg.head_width)

    def latents(self, audio: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """The latent heads' outputs: dual -> {'shared'}, separate -> {'f0', 'loudness'}."""
        if self.cfg.encoding == "dual":
            hidden = torch.cat([self.branches["waveform"](audio), self.branches["stft"](audio)], -1)
            return {"shared": self.heads["shared"](hidden)}
        return {"f0": self.heads["f0"](self.branches["pccc"](audio)),
                "loudness": self.heads["loudness"](self.branches["waveform"](audio))}

    def decode(self, z_f0: torch.Tensor, z_loudness: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.f0_decoder(z_f0).float()
        window = F0_DECODING_WINDOWS[self.cfg.f0_decoding]
        return {"f0_logits": logits, "f0_hz": pitch.decode_f0(torch.softmax(logits, dim=-1), window),
                "loudness_db": self.loudness_decoder(z_loudness).float()}

    def split(self, latents: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(z for the F0 decoder, z for the loudness decoder)."""
        if "shared" in latents:
            return latents["shared"]["z"], latents["shared"]["z"]
        return latents["f0"]["z"], latents["loudness"]["z"]

    def forward(self, audio: torch.Tensor) -> dict:
        latents = self.latents(audio)
        return {**self.decode(*self.split(latents)), "latents": latents}
