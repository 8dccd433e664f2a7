"""The DDSP decoder: F0 and loudness in, synthesiser controls and audio out (no z by default)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffcraft import HOP_LENGTH, SAMPLE_RATE
from diffcraft.audio.features import scale_loudness
from diffcraft.dsp import synths
from diffcraft.dsp.core import fill_unvoiced
from diffcraft.errors import ConfigError
from diffcraft.nn.cores import CoreName, make_core
from diffcraft.pitch import hz_to_midi


@dataclass
class DecoderConfig:
    core: CoreName = "gru"  # sequence core
    width: int = 512  # width of the MLPs and of the core (the published DDSP size)
    mlp_layers: int = 3  # Dense-LayerNorm-LeakyReLU layers per MLP
    core_layers: int = 1  # stacked GRU layers or Mamba blocks
    n_harmonics: int = 100  # harmonics of the oscillator bank
    n_noise_bands: int = 65  # filtered-noise magnitude bands (a 128-tap FIR)
    reverb_seconds: float = 3.0  # learned impulse response length; 0 turns reverb off
    latent_size: int = 0  # size of an extra per-frame z input (0: F0 and loudness only)

    def validate(self, where: str = "") -> None:
        p = f"{where}." if where else ""
        for name in ("width", "mlp_layers", "core_layers", "n_harmonics", "n_noise_bands"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: {getattr(self, name)} must be at least 1")
        if self.reverb_seconds < 0 or self.latent_size < 0:
            raise ConfigError(f"{p}reverb_seconds and latent_size must not be negative")

    def head_layout(self) -> dict[str, int]:
        """The raw synthesiser controls the output head emits per frame, in order, with their sizes."""
        return {"amplitude_raw": 1, "distribution_raw": self.n_harmonics, "noise_raw": self.n_noise_bands}


def mlp(input_size: int, width: int, n_layers: int) -> nn.Sequential:
    layers, size = [], input_size
    for _ in range(n_layers):
        layers += [nn.Linear(size, width), nn.LayerNorm(width), nn.LeakyReLU(0.2)]
        size = width
    return nn.Sequential(*layers)


def split_head(joined: torch.Tensor, layout: dict[str, int]) -> dict[str, torch.Tensor]:
    """[..., sum of sizes] -> {control: [..., its size]}, the controls in `layout`'s order."""
    return dict(zip(layout, joined.split(list(layout.values()), -1)))


class DDSPDecoder(nn.Module):
    """Per-input MLPs -> core -> output MLP -> (amplitude, harmonic distribution, noise bands)
    -> harmonic + filtered-noise synthesis -> reverb."""

    def __init__(self, cfg: DecoderConfig, sample_rate: int = SAMPLE_RATE, hop: int = HOP_LENGTH):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        n_inputs = 2 + (cfg.latent_size > 0)
        self.f0_mlp = mlp(1, w, cfg.mlp_layers)
        self.loudness_mlp = mlp(1, w, cfg.mlp_layers)
        self.z_mlp = mlp(cfg.latent_size, w, cfg.mlp_layers) if cfg.latent_size else None
        self.core = make_core(cfg.core, n_inputs * w, w, cfg.core_layers)
        self.out_mlp = mlp((n_inputs + 1) * w, w, cfg.mlp_layers)
        self.head = nn.Linear(w, sum(cfg.head_layout().values()))
        self.harmonic = synths.Harmonic(sample_rate, hop)
        self.noise = synths.FilteredNoise(hop)
        reverb_length = int(cfg.reverb_seconds * sample_rate)
        self.reverb = synths.Reverb(reverb_length, sample_rate) if reverb_length > 1 else None

    def controls(self, f0_hz, loudness_db, z=None) -> dict[str, torch.Tensor]:
        """f0_hz, loudness_db: [batch, frames]; z: [batch, frames, latent] -> raw synth controls."""
        hidden = [self.f0_mlp(hz_to_midi(f0_hz.clamp_min(1.0))[..., None] / 127.0),
                  self.loudness_mlp(scale_loudness(loudness_db)[..., None])]
        if self.z_mlp is not None:
            hidden.append(self.z_mlp(z))
        stacked = torch.cat(hidden, dim=-1)
        out = self.head(self.out_mlp(torch.cat([self.core(stacked), stacked], dim=-1)))
        return split_head(out, self.cfg.head_layout())

    def forward(self, f0_hz, loudness_db, z=None) -> dict[str, torch.Tensor]:
        """-> {'audio': [batch, frames * hop], 'harmonic', 'noise' (dry parts), raw controls}."""
        f0_hz = fill_unvoiced(f0_hz.float())
        return self.synthesize(f0_hz, self.controls(f0_hz, loudness_db, z))

    def synthesize(self, f0_hz, raw: dict) -> dict[str, torch.Tensor]:
        """Audio from f0 (unvoiced frames already filled) and raw controls, always in float32."""
        with torch.autocast(f0_hz.device.type, enabled=False):
            raw = {k: v.float() for k, v in raw.items()}
            harmonic = self.harmonic(raw["amplitude_raw"], raw["distribution_raw"], f0_hz)
            noise = self.noise(raw["noise_raw"])
            dry = harmonic + noise
            audio = self.reverb(dry) if self.reverb is not None else dry
        return {"audio": audio, "harmonic": harmonic, "noise": noise, **raw}
