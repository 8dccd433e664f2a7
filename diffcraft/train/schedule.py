"""The learning-rate schedules: exponential decay per step (the default), step decay per epochs,
and the paper's decay on plateau of the selection metric. Their state travels in the checkpoint."""
from __future__ import annotations

import torch

from diffcraft.errors import ConfigError
from diffcraft.train.config import TrainConfig


def scheduled_lr(cfg: TrainConfig, step: int, epoch: int) -> float | None:
    """The learning rate of a step that the step and epoch alone decide (exponential, step); None
    for the plateau schedule, whose rate only changes after an epoch (`LRSchedule.after_epoch`)."""
    if cfg.lr_schedule == "exponential":
        return cfg.lr * cfg.lr_decay ** (step / cfg.lr_decay_steps)
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_decay ** (epoch // cfg.lr_step_epochs)
    return None


class LRSchedule:
    """The run's learning rate: set before each step by `scheduled_lr`, or, for the plateau schedule,
    cut by `lr_decay` (torch's ReduceLROnPlateau) when the selection metric stalls for
    `lr_plateau_patience` epochs; its state travels in the checkpoint so a resumed run goes on exactly."""

    def __init__(self, cfg: TrainConfig, optimizer: torch.optim.Optimizer, mode: str):
        self.cfg, self.optimizer = cfg, optimizer
        self.plateau = None
        if cfg.lr_schedule == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=mode, factor=cfg.lr_decay, patience=cfg.lr_plateau_patience, min_lr=cfg.lr_min)

    def before_step(self, step: int, epoch: int) -> None:
        lr = scheduled_lr(self.cfg, step, epoch)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def after_epoch(self, value: float) -> None:
        """The epoch's selection metric (the same on every rank)."""
        if self.plateau is not None:
            self.plateau.step(value)

    def state_dict(self) -> dict:
        return {"kind": self.cfg.lr_schedule, **({"plateau": self.plateau.state_dict()} if self.plateau else {})}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what `state_dict()` saved (ValueError: a plateau run's checkpoint without its state)."""
        if self.plateau is not None:
            if "plateau" not in state_dict:
                kind = state_dict.get("kind", "exponential")
                raise ValueError(f"it holds no plateau schedule state (its schedule: {kind})")
            self.plateau.load_state_dict(state_dict["plateau"])


def schedule_epoch(run, metrics: dict | None) -> None:
    """Every rank, after an epoch and before its commit saves the schedule: the plateau schedule
    reads the selection metric, rank 0's (the only one that evaluates) broadcast to the others."""
    if run.schedule.plateau is None:
        return
    key = run.select[0]
    if metrics is not None and key not in metrics:
        raise ConfigError(f"train.lr_schedule: plateau follows the selection metric {key!r}, which this run "
                          f"does not report")
    run.schedule.after_epoch(run.session.share(float(metrics[key]) if metrics is not None else 0.0))
