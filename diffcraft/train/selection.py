"""The objective: the metric that picks the best epoch, trial or configuration, and its mode. The
one rule that compares two values by it (`better`) lives here; the loop's best epoch, a trial's
best checkpoint, the collapse guard's penalty, a report's ranking and promotion all use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Literal, TypeVar

from diffcraft.train.names import VAL_LOSS

Mode = Literal["min", "max"]
T = TypeVar("T")


def better(value: float, than: float, mode: Mode) -> bool:
    """Whether `value` is strictly better than `than`: smaller (mode min) or larger (mode max)."""
    return value < than if mode == "min" else value > than


@dataclass
class Objective:
    metric: str = VAL_LOSS  # any per-epoch metric, e.g. val_mss_mean, val_rpa, val_loss
    mode: Mode = "min"

    def better(self, value: float, than: float) -> bool:
        return better(value, than, self.mode)

    def improves(self, metrics: dict, best: dict) -> bool:
        """Whether an epoch's `metrics` beat the `best` so far (an empty best, or one without the
        metric, is always beaten)."""
        return self.metric not in best or self.better(metrics[self.metric], best[self.metric])

    def best(self, items: Iterable[T], key: Callable[[T], float]) -> T:
        """The first item whose key no other item's key is better than."""
        chosen, first = None, True
        for item in items:
            if first or self.better(key(item), key(chosen)):
                chosen, first = item, False
        if first:
            raise ValueError("no item to choose from")
        return chosen

    def rank(self, value: float) -> float:
        """A sort key that puts better values first (nan is the caller's to place)."""
        return value if self.mode == "min" else -value

    def penalized(self, value: float, penalty: float) -> float:
        """`value` made worse by `penalty`."""
        return value + penalty if self.mode == "min" else value - penalty
