"""What a trained encoder's latents hold, drawn from a few clips: the figures logged with a model.

latent_tsne.png           t-SNE of the per-frame posterior means of the F0 and loudness latents,
                          coloured by each frame's pitch and loudness (the paper's Fig. 4)
latent_interpolation.png  F0 and loudness decoded between the latents of the two clips furthest
                          apart in pitch (Fig. 6)

The first `max_clips` clips are encoded, in order and under seeded noise, and the t-SNE maps a
seeded subset of their frames: the same weights and clips always give the same figures, in seconds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffcraft.errors import DataError
from diffcraft.pitch import hz_to_midi
from diffcraft.plots import embedding_figure, interpolation_figure
from diffcraft.train.evaluate import seeded
from diffcraft.train.loss import VOICED

MAX_CLIPS = 8  # clips encoded (32 s, 3200 frames); t-SNE maps at most plots' max_points of their frames
BATCH_CLIPS = 4  # clips through the encoder at a time


def _posterior_means(encoder, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_f0, z_loudness) [clips, frames, latent]: the means the F0 and loudness decoders read
    (the same shared latent for the dual encoding), BATCH_CLIPS clips at a time."""
    device = next(encoder.parameters()).device
    parts = []
    for chunk in audio.split(BATCH_CLIPS):
        latents = encoder.latents(chunk.to(device))
        parts.append(encoder.split({name: {**head, "z": head["mu"]} for name, head in latents.items()}))
    return tuple(torch.cat(z).float().cpu() for z in zip(*parts))


def _furthest_in_pitch(f0_hz: torch.Tensor, voiced: torch.Tensor) -> tuple[int, int, str]:
    """(i, j, caption): the clips [clips, frames] with the lowest and highest median voiced pitch,
    or the first two when fewer than two clips have voiced frames."""
    medians = [float(np.median(hz_to_midi(f[v].numpy()))) if v.any() else np.nan for f, v in zip(f0_hz, voiced)]
    ranked = [i for i in np.argsort(medians) if np.isfinite(medians[i])]
    if len(ranked) < 2:
        return 0, 1, "clips 0 and 1 (too few voiced frames to pick them by pitch)"
    i, j = int(ranked[0]), int(ranked[-1])
    return i, j, f"clip {i} (median MIDI {medians[i]:.1f}) to clip {j} (median MIDI {medians[j]:.1f})"


def latent_figures(model, clips, out_dir, max_clips: int = MAX_CLIPS) -> list[Path]:
    """[latent_tsne.png, latent_interpolation.png] written to `out_dir` for a model with an encoder,
    [] for a decoder-stage model. `clips`: a sequence of {audio [n_samples], f0_hz, voicing,
    loudness_db [n_frames]} such as a ClipDataset, of which at least 2 are needed (DataError)."""
    encoder = model.encoder
    if encoder is None:
        return []
    chosen = [clips[i] for i in range(min(max_clips, len(clips)))]
    if len(chosen) < 2:
        raise DataError(f"{len(chosen)} clip(s): the latent figures need at least 2 (to interpolate between)")
    batch = {k: torch.stack([clip[k] for clip in chosen]) for k in ("audio", "f0_hz", "voicing", "loudness_db")}
    voiced = (batch["voicing"] >= VOICED) & (batch["f0_hz"] > 0)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), seeded(0):
            z_f0, z_loudness = _posterior_means(encoder, batch["audio"])
            titles = ("shared latent",) * 2 if encoder.cfg.encoding == "dual" else ("F0 latent", "loudness latent")
            out_dir = Path(out_dir)
            tsne = embedding_figure(out_dir / "latent_tsne.png", z_f0.reshape(-1, z_f0.shape[-1]),
                                    z_loudness.reshape(-1, z_loudness.shape[-1]), batch["f0_hz"],
                                    batch["loudness_db"], voiced=voiced, titles=titles)
            i, j, caption = _furthest_in_pitch(batch["f0_hz"], voiced)
            interpolation = interpolation_figure(out_dir / "latent_interpolation.png", encoder, batch["audio"][i],
                                                 batch["audio"][j], title=f"interpolation from {caption}")
    finally:
        encoder.train(was_training)
    return [tsne, interpolation]
