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
        try:
            fit = smf.mixedlm("y ~ x", frame, groups=np.ones(len(frame)), re_formula="0",
                              vc_formula=components).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError):  # e.g. scores without any spread: nothing to estimate
            return math.nan, math.nan, df, MIXED
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


@dataclass(frozen=True)
class Effect:
    """One contrast of a two-factor design, from the trials' means (a cell-means linear model)."""
    name: str  # "A: x vs x0", or "A x B: (x, y)" for an interaction
    estimate: float
    low: float
    high: float
    p: float
    df: int  # trials minus cells: the seeds' spread within each cell


def factorial_effects(cells: dict[tuple[str, str], list[float]], factors: tuple[str, str],
                      level: float = LEVEL) -> list[Effect]:
    """Main effects (each level against the first, averaged over the other factor's levels) and
    interactions (each pair of non-first levels: the difference of differences) of a crossed two-
    factor design; `cells`: (level of A, level of B) -> its trials' means. Empty when the design is
    not fully crossed or leaves no degrees of freedom."""
    from scipy import stats

    a_levels = sorted({a for a, _ in cells})
    b_levels = sorted({b for _, b in cells})
    if len(a_levels) < 2 or len(b_levels) < 2 or any(len(cells.get((a, b), [])) < 1 for a in a_levels
                                                      for b in b_levels):
        return []
    means = {k: sum(v) / len(v) for k, v in cells.items()}
    df = sum(len(v) for v in cells.values()) - len(cells)
    if df < 1:
        return []
    s2 = sum((x - means[k]) ** 2 for k, v in cells.items() for x in v) / df  # pooled within-cell variance
    quantile = stats.t.ppf(0.5 + level / 2, df)

    def contrast(name: str, weights: dict[tuple[str, str], float]) -> Effect:
        estimate = sum(w * means[k] for k, w in weights.items())
        se = math.sqrt(s2 * sum(w * w / len(cells[k]) for k, w in weights.items()))
        p = float(2 * stats.t.sf(abs(estimate) / se, df)) if se > 0 else math.nan
        return Effect(name, estimate, estimate - quantile * se, estimate + quantile * se, p, df)

    out = []
    for factor, levels, others, key in ((factors[0], a_levels, b_levels, lambda x, o: (x, o)),
                                        (factors[1], b_levels, a_levels, lambda x, o: (o, x))):
        for x in levels[1:]:
            weights: dict = {}
            for o in others:
                weights[key(x, o)] = weights.get(key(x, o), 0.0) + 1 / len(others)
                weights[key(levels[0], o)] = weights.get(key(levels[0], o), 0.0) - 1 / len(others)
            out.append(contrast(f"{factor}: {x} vs {levels[0]}", weights))
    for a in a_levels[1:]:
        for b in b_levels[1:]:
            out.append(contrast(f"{factors[0]} x {factors[1]}: ({a}, {b})", {
                (a, b): 1.0, (a_levels[0], b): -1.0, (a, b_levels[0]): -1.0, (a_levels[0], b_levels[0]): 1.0}))
    return out
