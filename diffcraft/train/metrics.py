"""Summary statistics as the paper reports them (mean ± standard error, standard deviation) and the
latent diagnostic of active units. Pitch accuracies, being pitch math, live in `diffcraft.pitch`."""
from __future__ import annotations

import math

import torch


def mean_se_sd(values) -> tuple[float, float, float]:
    """Mean, standard error of the mean and sample standard deviation of a 1-D set of values
    (the spread of a single value is unknown: nan, not 0)."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    sd = float(values.std(unbiased=True)) if n > 1 else float("nan")
    return mean, sd / math.sqrt(n), sd


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Burda et al.'s active units over (example, frame) pairs: a latent dimension is active when
    the variance of its posterior mean across the data exceeds `threshold`.
    mu: [..., latent] -> (count, per-dimension variance [latent])."""
    flat = mu.reshape(-1, mu.shape[-1]).double()
    variance = flat.var(dim=0, unbiased=True) if flat.shape[0] > 1 else torch.zeros(flat.shape[-1])
    return int((variance > threshold).sum()), variance.float()


def mean_of_means(per_seed: list[float]) -> tuple[float, float, int]:
    """Across seeds: the mean of the seed means and its standard error over seeds (nan with one
    seed: one run says nothing about the spread between runs), and the number of seeds."""
    mean, se, _ = mean_se_sd(per_seed)
    return mean, se, len(per_seed)


def paired_difference(a: dict[str, float], b: dict[str, float]) -> tuple[float, float, int]:
    """A minus B on the clips both were scored on ({clip name: score}, nan scores left out): the
    mean paired difference, its standard error and the number of pairs. Pairing removes the
    clip-to-clip spread that two independent means would carry."""
    shared = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
    mean, se, _ = mean_se_sd([a[c] - b[c] for c in shared])
    return mean, se, len(shared)


def write_clip_table(path, names: list[str], scores: dict[str, torch.Tensor]):
    """One row per clip (`clip` then one column per score) as CSV; returns the path."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip", *scores])
        for i, name in enumerate(names):
            writer.writerow([name, *(repr(float(values[i])) for values in scores.values())])
    return path


def read_clip_table(text: str) -> dict[str, dict[str, float]]:
    """{score: {clip name: value}} from `write_clip_table`'s CSV text."""
    import csv
    import io

    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    return {score: {row[0]: float(row[j]) for row in body} for j, score in enumerate(header) if j}
