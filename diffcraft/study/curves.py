"""Learning curves of a study: the validation metric per epoch, mean and t band over seeds, one
line per configuration; one figure, logged to the study's parent run beside the report."""
from __future__ import annotations

from pathlib import Path

from diffcraft.study.stats import LEVEL, SeedInterval, seed_interval


def curve_bands(histories: dict[str, list[dict[int, float]]]) -> dict[str, list[tuple[int, SeedInterval]]]:
    """Per configuration ({name: one {epoch: value} per seed}), each epoch's values over the seeds
    that reached it: [(epoch, SeedInterval)] in epoch order."""
    out = {}
    for name, seeds in histories.items():
        epochs = sorted({e for history in seeds for e in history})
        out[name] = [(e, seed_interval([h[e] for h in seeds if e in h])) for e in epochs]
    return out


def plot_curves(bands: dict[str, list[tuple[int, SeedInterval]]], metric: str, path: Path) -> Path:
    """The bands as one figure (a line per configuration, its band where two seeds or more reached the epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in bands.items():
        epochs = [e + 1 for e, _ in points]
        line, = ax.plot(epochs, [i.mean for _, i in points], label=f"{name} ({max(i.n for _, i in points)} seeds)")
        banded = [(e + 1, i) for e, i in points if i.n > 1]
        if banded:
            ax.fill_between([e for e, _ in banded], [i.low for _, i in banded], [i.high for _, i in banded],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds, {LEVEL:.0%} t band")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def learning_curves(client, groups: dict, metric: str, path: Path) -> Path | None:
    """The figure of `metric` for a study's configurations ({name: [TrialRecord]}), read from
    MLflow (an epoch logged twice after a resume: its last value); None when nothing was logged."""
    histories = {}
    for name, records in groups.items():
        seeds = []
        for r in records:
            history = {m.step: m.value for m in sorted(client.get_metric_history(r.run_id, metric),
                                                       key=lambda m: m.timestamp)}
            if history:
                seeds.append(history)
        if seeds:
            histories[name] = seeds
    return plot_curves(curve_bands(histories), metric, path) if histories else None
