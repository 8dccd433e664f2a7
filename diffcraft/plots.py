"""Figures a researcher reads instead of numbers, written as PNG files (matplotlib, no display).

spectrogram_figure  ground truth vs synthesis with the F0 contour (the paper's Fig. 7)
embedding_figure    t-SNE of F0 and loudness latents coloured by pitch and loudness (Fig. 4)
interpolation_figure  F0 and loudness decoded from z1 + alpha (z2 - z1) (Fig. 6)
loss_curve_figure   training and validation curves per epoch
"""
from __future__ import annotations

import textwrap
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


MIN_TSNE_POINTS = 10  # fewer frames than this make no map worth reading


def _tsne_problem(z: np.ndarray) -> str:
    """Why these points [n, dims] cannot be embedded, or '' when they can: sklearn's t-SNE needs
    a handful of points, and with PCA init it crashes the process on (near) constant ones."""
    if len(z) < MIN_TSNE_POINTS:
        return f"{len(z)} frames, t-SNE needs at least {MIN_TSNE_POINTS}"
    if not np.isfinite(z).all():
        return "the latent holds NaN or Inf"
    spread = float(np.std(z.astype(np.float64), axis=0).max())
    if spread <= 1e-6 * max(1.0, float(np.abs(z).max())):
        return f"the latent is constant over these frames (std {spread:.1e}): nothing to embed"
    return ""


def embedding_figure(path, z_f0, z_loudness, f0_hz, loudness_db, max_points: int = 1000,
                     seed: int = 0, voiced=None, titles=("F0 latent", "loudness latent")) -> Path:
    """t-SNE of per-frame F0 and loudness latents ([frames, latent] each), coloured by the frame's
    pitch (MIDI) and loudness (dB). Frames not `voiced` (default: f0 <= 0) are left out of the F0
    map; at most `max_points` frames per map (a seeded draw) keep it to seconds. A map that cannot
    be drawn says why in its panel instead. t-SNE runs on one thread: its OpenMP runtime beside
    torch's spin-waits for minutes on a busy machine, where one thread takes about two seconds."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    z_f0, z_ld = _numpy(z_f0), _numpy(z_loudness)
    f0, loud = _numpy(f0_hz).reshape(-1), _numpy(loudness_db).reshape(-1)
    voiced = f0 > 0 if voiced is None else _numpy(voiced).reshape(-1).astype(bool)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, z, colour, label, keep, title in (
            (axes[0], z_f0, hz_to_midi(np.maximum(f0, 1e-3)), "pitch (MIDI)", voiced, titles[0]),
            (axes[1], z_ld, loud, "loudness (dB)", np.ones_like(loud, dtype=bool), titles[1])):
        index = np.flatnonzero(keep)
        index = np.sort(rng.choice(index, min(max_points, len(index)), replace=False))
        problem = _tsne_problem(z[index])
        if problem:
            ax.text(0.5, 0.5, "no t-SNE map:\n" + textwrap.fill(problem, 40), ha="center", va="center",
                    transform=ax.transAxes)
        else:
            perplexity = max(2.0, min(30.0, (len(index) - 1) / 3))
            tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
            with threadpool_limits(1):
                points = tsne.fit_transform(z[index].astype(np.float64))
            sc = ax.scatter(points[:, 0], points[:, 1], c=colour[index], s=4, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=label)
        ax.set_title(f"{title} (t-SNE), coloured by {label.split()[0]}")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def interpolation_figure(path, encoder, audio_a, audio_b, alphas=INTERPOLATION_ALPHAS, title: str = "") -> Path:
    """Decode F0 and loudness from z_a + alpha (z_b - z_a) for each alpha, z the posterior means
    of the two clips (audio [n_samples] each); the encoder runs in eval mode and is left as it was."""
    was_training = encoder.training
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
    encoder.train(was_training)
    axes[0].set(title="F0 from the interpolated latent", xlabel="time (s)", ylabel="Hz", yscale="log")
    axes[1].set(title="loudness from the interpolated latent", xlabel="time (s)", ylabel="dB")
    axes[1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
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
