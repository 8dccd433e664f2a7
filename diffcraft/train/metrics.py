"""Summary statistics of one run's clips (mean ± standard error, standard deviation), the per-clip
tables a report compares runs on, and the latent diagnostic of active units. Statistics across
runs, with the seed as the unit, live in `diffcraft.study.stats`; pitch accuracies, being pitch
math, in `diffcraft.pitch`."""
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
