"""The search: what a study varies, parsed once when the study file loads, and everything computed
from it: the trials it can produce (`variants`), each trial's run config, its label and hashes,
and Tune's search space.

```yaml
search:
  algorithm: grid                     # optuna | grid | random
  space:                              # dotted run-config field -> one distribution
    model.decoder.core: {grid: [gru, mamba, bigru, bimamba]}
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  samples: 1                          # optuna/random: trials drawn; grid: repeats of the grid
  seeds: 3                            # seeds per configuration (a grid over train.seed)
```
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from diffcraft.errors import ConfigError, StudyConfigError
from diffcraft.train.config import RunConfig
from diffcraft.typed_yaml import with_values

SEED = "train.seed"  # the field `search.seeds` repeats a configuration over
MAX_VARIANTS = 4096


DIMENSIONS = ("loguniform", "uniform", "int", "choice", "grid")  # the kinds a study file can write


@dataclass(frozen=True)
class Dimension:
    """One searched field's distribution, as the study file writes it: `{kind: [values]}`."""
    kind: str  # one of DIMENSIONS

    @staticmethod
    def from_yaml(spec, where: str) -> "Dimension":
        """The record of `{kind: [...]}` at `where` (search.space.FIELD), checked."""
        if not isinstance(spec, dict) or len(spec) != 1:
            raise StudyConfigError(f"{where}: expected one of {{{', '.join(DIMENSIONS)}: ...}}, got {spec!r}")
        (kind, values), = spec.items()
        if kind not in DIMENSIONS:
            raise StudyConfigError(f"{where}: {kind!r} is not one of {list(DIMENSIONS)}")
        if not isinstance(values, list) or not values:
            raise StudyConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in Values.KINDS:
            return Values(kind, tuple(values))
        return Range.parse(kind, values, f"{where}.{kind}")

    @staticmethod
    def yaml_schema() -> dict:
        """What an editor offers for one searched field."""
        return {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
                "properties": {kind: {"type": "array", "minItems": 1} for kind in DIMENSIONS}}

    def to_yaml(self) -> dict:
        """The study file's form, `{kind: [values]}`: what study.json keeps."""
        return {self.kind: list(self.corners())}

    def corners(self) -> tuple:
        """Every value of a choice or grid, the bounds of a range: what a trial of this dimension
        can be, as far as its stage, latents and sizes go."""
        raise NotImplementedError

    def tune_domain(self):
        """The Tune search-space domain that samples this dimension."""
        raise NotImplementedError


@dataclass(frozen=True)
class Values(Dimension):
    """`choice` (Tune samples one value per trial) or `grid` (every value, in every configuration;
    algorithms grid and random)."""
    values: tuple
    KINDS: ClassVar[tuple] = ("choice", "grid")

    def corners(self) -> tuple:
        return self.values

    def tune_domain(self):
        from ray import tune

        return (tune.grid_search if self.kind == "grid" else tune.choice)(list(self.values))


@dataclass(frozen=True)
class Range(Dimension):
    """`uniform`, `loguniform` (positive bounds) or `int` (integer bounds, both included)."""
    low: float
    high: float

    @classmethod
    def parse(cls, kind: str, values: list, where: str) -> "Range":
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise StudyConfigError(f"{where}: expected [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise StudyConfigError(f"{where}: low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise StudyConfigError(f"{where}: bounds must be positive, got {values!r}")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise StudyConfigError(f"{where}: bounds must be integers, got {values!r}")
        return cls(kind, low, high)

    def corners(self) -> tuple:
        return self.low, self.high

    def tune_domain(self):
        from ray import tune

        if self.kind == "int":
            return tune.randint(self.low, self.high + 1)
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)


@dataclass
class SearchConfig:
    algorithm: Literal["optuna", "grid", "random"] = "grid"  # optuna: TPE; grid: every combination; random: draws
    space: dict[str, Dimension] = field(default_factory=dict)  # dotted run-config field -> one distribution
    samples: int = 1  # optuna/random: trials drawn; grid: repeats of the grid
    seeds: int = 1  # seeds per configuration (a grid over train.seed)
    match_parameters: bool = False  # each trial's model.decoder.width set so it has the run: model's parameters

    def searched(self) -> set[str]:
        """The run-config fields that differ between trials (train.seed with several seeds)."""
        return set(self.space) | ({SEED} if self.seeds > 1 else set())

    def trial_config(self, base: RunConfig, params: dict[str, Any]) -> RunConfig:
        """A trial's run config: `base` with the trial's values, and with `match_parameters` the
        decoder width that gives it as many parameters as `base`'s model."""
        from diffcraft.models.sizing import matched_width, model_parameters

        cfg = with_values(base, params)
        if self.match_parameters:
            cfg.model.decoder.width = matched_width(cfg.model, model_parameters(base.model))
        return cfg

    def variants(self, base: RunConfig) -> list[tuple[dict, RunConfig]]:
        """(searched values, run config) for every combination of the choice and grid values and
        of the bounds of the ranges (the first MAX_VARIANTS; seeds aside): the trials the search
        can produce, as far as their stage, latents and sizes go."""
        keys = [key for key in self.space if key != SEED]
        out = []
        for combo in itertools.islice(itertools.product(*(self.space[k].corners() for k in keys)), MAX_VARIANTS):
            params = dict(zip(keys, combo))
            try:
                out.append((params, self.trial_config(base, params)))
            except ConfigError as err:
                raise StudyConfigError(f"search.space: the combination {params} does not fit the run config "
                                       f"({err})") from None
        return out

    def tune_space(self, base_seed: int) -> dict:
        """Tune's param_space: one domain per searched field, the seeds as a grid from `base_seed`."""
        space = {key: dimension.tune_domain() for key, dimension in self.space.items()}
        if self.seeds > 1:
            from ray import tune

            space[SEED] = tune.grid_search([base_seed + i for i in range(self.seeds)])
        return space


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest tail that no other key ends with: model.decoder.core -> core,
    or decoder.core beside model.encoder.core."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        out[key] = tail
    return out


def _short_value(value) -> str:
    """3 significant digits for floats, very small or large ones as 3.16e-4."""
    if not isinstance(value, float) or value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def trial_label(params: dict) -> str:
    """A trial's name from what varies, short: 'core=bimamba lr=3.2e-4 seed=1' ('base' for none)."""
    names = short_keys(list(params))
    return " ".join(f"{names[k]}={_short_value(v)}" for k, v in params.items())[:250] or "base"


def config_hash(params: dict, without_seed: bool = False) -> str:
    """Short stable hash of a trial's parameters (seed left out: the configuration group)."""
    items = {k: v for k, v in params.items() if not (without_seed and k == SEED)}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:12]
