"""DiffCraft: audio -> encoder -> F0 and loudness -> DDSP decoder -> audio.

The training stage decides which parts exist and what feeds the decoder:
  decoder  DDSP decoder alone, driven by the labels (ground-truth or CREPE F0, loudness)
  encoder  the audio encoder alone, supervised by the labels
  joint    both: the decoder is driven by the encoder's F0 and loudness. The F0 estimate enters
           the synthesiser detached (the oscillator's gradient with respect to frequency is a poor
           teacher; F0 is learned from its supervised loss), loudness keeps its gradient.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from diffcraft.models.decoder import DDSPDecoder, DecoderConfig
from diffcraft.models.encoders import AudioEncoder, EncoderConfig


STAGE_PARTS = {"decoder": ("decoder",), "encoder": ("encoder",), "joint": ("encoder", "decoder")}  # what exists


@dataclass
class ModelConfig:
    stage: Literal["decoder", "encoder", "joint"] = "decoder"  # the parts that exist: STAGE_PARTS
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    @property
    def has_encoder(self) -> bool:
        return "encoder" in STAGE_PARTS[self.stage]

    @property
    def has_decoder(self) -> bool:
        return "decoder" in STAGE_PARTS[self.stage]

    @property
    def is_vae(self) -> bool:
        return self.has_encoder and self.encoder.latent == "vae"


class DiffCraft(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = AudioEncoder(cfg.encoder) if cfg.has_encoder else None
        self.decoder = DDSPDecoder(cfg.decoder) if cfg.has_decoder else None

    @property
    def is_vae(self) -> bool:
        return self.cfg.is_vae

    def forward(self, audio: torch.Tensor, f0_hz: torch.Tensor | None = None,
                loudness_db: torch.Tensor | None = None) -> dict:
        """audio [batch, samples]; labels [batch, frames] (needed by the decoder stage) ->
        encoder outputs ('f0_logits', 'f0_hz', 'loudness_db', 'latents') and/or 'synth'."""
        out = self.encoder(audio) if self.encoder is not None else {}
        if self.decoder is not None:
            if self.encoder is not None:
                f0_hz, loudness_db = out["f0_hz"].detach(), out["loudness_db"]
            out["synth"] = self.decoder(f0_hz, loudness_db)
        return out
