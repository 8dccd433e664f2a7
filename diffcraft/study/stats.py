"""The report's statistics, with the trained network (one seed) as the experimental unit: a
configuration's mean over seeds with its t interval, and its difference to a baseline from a mixed
model whose random effects are the trial (seed), the song and the clip, with Holm-corrected
p-values, an effect size over the seed SD and a TOST equivalence test. Pure functions of numbers.

Why: clips scored by the same network share that network's luck, and clips of one song share the
song, so neither clips nor (seed, clip) pairs are independent; the seeds are.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

LEVEL = 0.95  # every interval's coverage; TOST tests at 1 - LEVEL
MIXED = "mixed"  # a difference fitted on per-clip scores: random intercepts for trial, song and clip
SEEDS = "seed means"  # a difference from the trials' means alone (no per-clip scores): Student's t
METHODS = {
    MIXED: "linear mixed model on the per-clip scores (statsmodels MixedLM, REML): score ~ configuration, with "
           "random intercepts for the trial (its seed), the song and the clip (those with more than one level)",
    SEEDS: "Student's t-test on the trials' means (no per-clip scores were logged)"}


@dataclass(frozen=True)
class SeedInterval:
    """A configuration's mean over seeds (each seed's value: that trial's mean over clips)."""
    mean: float
    low: float  # t-based LEVEL interval (n - 1 degrees of freedom); nan with one seed
    high: float
    sd: float  # the standard deviation between seeds; nan with one seed
    n: int


def seed_interval(values: list[float], level: float = LEVEL) -> SeedInterval:
    """Mean over seeds with its t interval and the seed SD (one seed: no spread is known, nan)."""
    from scipy import stats

    values = [float(v) for v in values if math.isfinite(v)]
    n = len(values)
    if n == 0:
        return SeedInterval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n == 1:
        return SeedInterval(mean, math.nan, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return SeedInterval(mean, mean - half, mean + half, sd, n)


@dataclass(frozen=True)
class ClipScore:
    """One clip's score by one trial; the clip's song is its name's first part (`song/file#index`)."""
    config: str
    trial: str
    clip: str
    value: float

    @property
    def song(self) -> str:
        return self.clip.split("/", 1)[0]


@dataclass
class Difference:
    """A configuration minus the baseline on one metric."""
    estimate: float
    se: float
    df: int  # trials of both minus 2: the difference varies between trials, the unit
    low: float  # t-based LEVEL interval
    high: float
    p: float  # two-sided, H0: no difference
    effect: float  # estimate over the pooled seed SD of both (Cohen's d with seeds as the unit)
    margin: float  # the equivalence margin (nan: none set)
    tost_p: float  # TOST, H0: |difference| >= margin (nan without a margin)
    method: str  # MIXED or SEEDS
    p_holm: float = math.nan  # Holm-corrected over the comparisons of the same metric
    tost_p_holm: float = math.nan

    @property
    def equivalent(self) -> bool:
        return self.tost_p_holm < 1 - LEVEL


def fit_difference(scores: list[ClipScore], config: str, baseline: str) -> tuple[float, float, int, str]:
    """`config` minus `baseline`: (estimate, standard error, degrees of freedom, method). From a
    mixed model when trials have several clips each, else from the trials' means (Student's t)."""
    import numpy as np
    import pandas as pd
    import statsmodels.formula.api as smf

    rows = [s for s in scores if s.config in (config, baseline) and math.isfinite(s.value)]
    frame = pd.DataFrame({"y": [s.value for s in rows], "x": [float(s.config == config) for s in rows],
                          "trial": [s.trial for s in rows], "song": [s.song for s in rows],
                          "clip": [s.clip for s in rows]})
    trials = frame.groupby("trial")["x"].first()
    df = len(trials) - 2
    if int(trials.sum()) < 1 or int(len(trials) - trials.sum()) < 1 or df < 1:
        return math.nan, math.nan, max(df, 0), SEEDS
    if frame.groupby("trial").size().max() == 1:
        fit = smf.ols("y ~ x", frame).fit()
        return float(fit.params["x"]), float(fit.bse["x"]), df, SEEDS
    components = {name: f"0 + C({name})" for name in ("trial", "song", "clip") if frame[name].nunique() > 1}
    with warnings.catch_warnings():  # a variance at its boundary (0) is an answer, not a failure
        warnings.simplefilter("ignore")
        fit = smf.mixedlm("y ~ x", frame, groups=np.ones(len(frame)), re_formula="0",
                          vc_formula=components).fit(reml=True)
    return float(fit.params["x"]), float(fit.bse["x"]), df, MIXED


def pooled_sd(a: list[float], b: list[float]) -> float:
    """The standard deviation between seeds, pooled over two configurations."""
    dof = len(a) + len(b) - 2
    if dof < 1:
        return math.nan
    ss = sum((v - sum(a) / len(a)) ** 2 for v in a) + sum((v - sum(b) / len(b)) ** 2 for v in b)
    return math.sqrt(ss / dof)


def tost_p(estimate: float, se: float, df: int, margin: float) -> float:
    """Two one-sided t-tests of |difference| >= margin: the larger of their p-values (small:
    the difference lies within ± margin)."""
    from scipy import stats

    if not (math.isfinite(margin) and margin > 0 and math.isfinite(se) and se > 0 and df >= 1):
        return math.nan
    below = stats.t.sf((estimate + margin) / se, df)  # H0: difference <= -margin
    above = stats.t.cdf((estimate - margin) / se, df)  # H0: difference >= +margin
    return float(max(below, above))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down correction of a family of p-values (nan ones stay nan, outside the family)."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out


def difference(scores: list[ClipScore], config: str, baseline: str, seed_means: dict[str, list[float]],
               margin: float = math.nan, level: float = LEVEL) -> Difference:
    """`config` minus `baseline` on one metric (`seed_means`: each configuration's trial means)."""
    from scipy import stats

    estimate, se, df, method = fit_difference(scores, config, baseline)
    if math.isfinite(se) and se > 0:
        half = stats.t.ppf(0.5 + level / 2, df) * se
        p = float(2 * stats.t.sf(abs(estimate) / se, df))
    else:
        half = p = math.nan
    sd = pooled_sd(seed_means.get(config, []), seed_means.get(baseline, []))
    return Difference(estimate, se, df, estimate - half, estimate + half, p,
                      estimate / sd if sd > 0 else math.nan, margin, tost_p(estimate, se, df, margin), method)


def compare_to(baseline: str, scores: list[ClipScore], seed_means: dict[str, list[float]],
               margin: float = math.nan) -> dict[str, Difference]:
    """Every other configuration against `baseline` on one metric, p-values Holm-corrected over them."""
    out = {c: difference(scores, c, baseline, seed_means, margin) for c in seed_means if c != baseline}
    for name in ("p", "tost_p"):
        for d, corrected in zip(out.values(), holm([getattr(d, name) for d in out.values()])):
            setattr(d, f"{name}_holm", corrected)
    return out
