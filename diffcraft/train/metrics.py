"""Summary statistics as the paper reports them: mean ± standard error, and standard deviation."""
from __future__ import annotations

import math

import torch


def mean_se_sd(values) -> tuple[float, float, float]:
    """Mean, standard error of the mean and sample standard deviation of a 1-D set of values."""
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = values.numel()
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    sd = float(values.std(unbiased=True)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n), sd
