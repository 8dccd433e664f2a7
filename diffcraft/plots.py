"""Figures a researcher reads instead of numbers, written as PNG files (matplotlib, no display).

spectrogram_figure  ground truth vs synthesis with the F0 contour (the paper's Fig. 7)
embedding_figure    t-SNE of F0 and loudness latents coloured by pitch and loudness (Fig. 4)
interpolation_figure  F0 and loudness decoded from z1 + alpha (z2 - z1) (Fig. 6)
loss_curve_figure   training and validation curves per epoch
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffcraft import HOP_LENGTH, SAMPLE_RATE  # noqa: E402
from diffcraft.pitch import hz_to_midi  # noqa: E402

INTERPOLATION_ALPHAS = (0.0, 0.3, 0.5, 0.7, 1.0)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _log_spectrogram(audio: np.ndarray, n_fft: int = 1024, hop: int = 128) -> np.ndarray:
    window = np.hanning(n_fft)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, (0, n_fft)), n_fft)[::hop]
    return 20 * np.log10(np.abs(np.fft.rfft(frames * window, axis=-1)).T + 1e-6)


def _numpy(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def spectrogram_figure(path, target_audio, synth_audio, f0_hz, title: str = "",
                       labels=("ground truth", "synthesis")) -> Path:
    """Two log spectrograms side by side; the F0 contour (Hz, one value per 10 ms frame) is drawn
    over the first. Audio at 16 kHz, 1-D."""
    target, synth, f0 = _numpy(target_audio).reshape(-1), _numpy(synth_audio).reshape(-1), _numpy(f0_hz).reshape(-1)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, audio, label in zip(axes, (target, synth), labels):
        spec = _log_spectrogram(audio)
        extent = (0, len(audio) / SAMPLE_RATE, 0, SAMPLE_RATE / 2)
        ax.imshow(spec, origin="lower", aspect="auto", extent=extent, cmap="magma",
                  vmin=spec.max() - 80, vmax=spec.max())
        ax.set_title(label)
        ax.set_xlabel("time (s)")
        ax.set_ylim(0, 4000)
    t = np.arange(len(f0)) * HOP_LENGTH / SAMPLE_RATE
    axes[0].plot(t, np.where(f0 > 0, f0, np.nan), color="cyan", linewidth=1.2, label="F0")
    axes[0].legend(loc="upper right")
    axes[0].set_ylabel("frequency (Hz)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def embedding_figure(path, z_f0, z_loudness, f0_hz, loudness_db, max_points: int = 2000,
                     seed: int = 0) -> Path:
    """t-SNE of per-frame F0 and loudness latents ([frames, latent] each), coloured by the frame's
    pitch (MIDI) and loudness (dB). Unvoiced frames (f0 <= 0) are left out of the F0 map."""
    from sklearn.manifold import TSNE

    z_f0, z_ld = _numpy(z_f0), _numpy(z_loudness)
    f0, loud = _numpy(f0_hz).reshape(-1), _numpy(loudness_db).reshape(-1)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, z, colour, label, keep in (
            (axes[0], z_f0, hz_to_midi(np.maximum(f0, 1e-3)), "pitch (MIDI)", f0 > 0),
            (axes[1], z_ld, loud, "loudness (dB)", np.ones_like(loud, dtype=bool))):
        index = np.flatnonzero(keep)
        index = rng.choice(index, min(max_points, len(index)), replace=False) if len(index) else index
        if len(index) >= 5:
            points = TSNE(2, perplexity=min(30, len(index) - 1), init="pca", random_state=seed).fit_transform(z[index])
            sc = ax.scatter(points[:, 0], points[:, 1], c=colour[index], s=4, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=label)
        ax.set_title(f"{label.split()[0]} embedding (t-SNE)")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def interpolation_figure(path, encoder, audio_a, audio_b, alphas=INTERPOLATION_ALPHAS) -> Path:
    """Decode F0 and loudness from z_a + alpha (z_b - z_a) for each alpha (encoder in eval mode)."""
    encoder.eval()
    with torch.no_grad():
        audio = torch.stack([torch.as_tensor(audio_a), torch.as_tensor(audio_b)]).float()
        latents = encoder.latents(audio.to(next(encoder.parameters()).device))
        z_f0, z_ld = encoder.split({k: {**h, "z": h["mu"]} for k, h in latents.items()})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        colours = plt.cm.coolwarm(np.linspace(0, 1, len(alphas)))
        for alpha, colour in zip(alphas, colours):
            out = encoder.decode(z_f0[:1] + alpha * (z_f0[1:] - z_f0[:1]), z_ld[:1] + alpha * (z_ld[1:] - z_ld[:1]))
            t = np.arange(out["f0_hz"].shape[-1]) * HOP_LENGTH / SAMPLE_RATE
            axes[0].plot(t, _numpy(out["f0_hz"][0]), color=colour, label=f"α={alpha:g}")
            axes[1].plot(t, _numpy(out["loudness_db"][0]), color=colour, label=f"α={alpha:g}")
    axes[0].set(title="F0 from the interpolated latent", xlabel="time (s)", ylabel="Hz", yscale="log")
    axes[1].set(title="loudness from the interpolated latent", xlabel="time (s)", ylabel="dB")
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def loss_curve_figure(path, history: list[dict], keys=None) -> Path:
    """One panel per metric over epochs (train_* and val_* scalars by default)."""
    scalar = [k for k in (history[0] if history else {}) if isinstance(history[0][k], (int, float))]
    keys = keys or [k for k in scalar if k.startswith(("train_", "val_")) and not k.endswith("_se")]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 3), squeeze=False)
    epochs = [h["epoch"] + 1 for h in history]
    for ax, key in zip(axes[0], keys):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
    return _save(fig, path)
