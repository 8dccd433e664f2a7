"""Learning-rate schedules: exponential (per step, the default), step (every few epochs) and plateau
(when the run's selection metric stalls); the rate each epoch ran at is in its metrics."""
import pytest
import torch

from diffcraft.errors import CheckpointError, ConfigError
from diffcraft.train.config import TrainConfig, load_run_config
from diffcraft.train.loop import train
from diffcraft.train.schedule import LRSchedule, scheduled_lr
from tests.conftest import tiny_run_config


def plateau_schedule(mode: str, **fields) -> tuple[LRSchedule, torch.optim.Optimizer]:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = TrainConfig(lr=1.0, lr_schedule="plateau", **fields)
    return LRSchedule(cfg, optimizer, mode), optimizer


def test_the_default_schedule_is_the_exponential_per_step_decay():
    cfg = TrainConfig(lr=1e-3, lr_decay=0.5, lr_decay_steps=10)
    assert cfg.lr_schedule == "exponential"
    assert scheduled_lr(cfg, step=0, epoch=0) == 1e-3
    assert scheduled_lr(cfg, step=5, epoch=7) == pytest.approx(1e-3 * 0.5 ** 0.5)
    assert scheduled_lr(cfg, step=20, epoch=7) == pytest.approx(1e-3 * 0.25)


def test_the_step_schedule_decays_every_lr_step_epochs_whatever_the_step():
    cfg = TrainConfig(lr=1e-3, lr_schedule="step", lr_decay=0.5, lr_step_epochs=3)
    rates = [scheduled_lr(cfg, step=1000 * epoch, epoch=epoch) for epoch in range(7)]
    assert rates == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4])


def test_the_plateau_schedule_decays_after_patience_stalled_epochs_down_to_lr_min():
    schedule, optimizer = plateau_schedule("min", lr_decay=0.5, lr_plateau_patience=1, lr_min=0.3)
    assert scheduled_lr(schedule.cfg, step=10, epoch=3) is None  # no per-step rate
    rates = []
    for value in [3.0, 2.0, 2.0, 2.5, 1.0, 1.0, 1.0, 1.0, 1.0]:
        schedule.after_epoch(value)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.3, 0.3, 0.3]


def test_the_plateau_schedule_follows_the_selection_metrics_direction():
    schedule, optimizer = plateau_schedule("max", lr_decay=0.5, lr_plateau_patience=0)
    for value in [0.5, 0.6, 0.7]:  # rising: every epoch improves
        schedule.after_epoch(value)
    assert optimizer.param_groups[0]["lr"] == 1.0
    schedule.after_epoch(0.6)
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_schedule_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"train.lr_schedule: 'cosine' is not one of"):
        load_run_config(overrides=["train.lr_schedule=cosine"])
    with pytest.raises(ConfigError, match=r"train.lr_step_epochs: 0 must be at least 1"):
        load_run_config(overrides=["train.lr_schedule=step", "train.lr_step_epochs=0"])
    with pytest.raises(ConfigError, match=r"train.lr_plateau_patience: -1 must not be negative"):
        load_run_config(overrides=["train.lr_plateau_patience=-1"])
    with pytest.raises(ConfigError, match=r"train.lr_min: -0.1 must not be negative"):
        load_run_config(overrides=["train.lr_min=-0.1"])
    with pytest.raises(ConfigError, match=r"train.lr_decay: 1.0 never lowers the learning rate"):
        load_run_config(overrides=["train.lr_schedule=plateau", "train.lr_decay=1.0"])
    assert load_run_config(overrides=["train.lr_decay=1.0"]).train.lr_decay == 1.0  # exponential: constant lr


def test_a_step_schedule_run_logs_the_rate_of_each_epoch(synth_cache, tmp_path):
    cfg = tiny_run_config(synth_cache, tmp_path, lr_schedule="step", lr_decay=0.5, lr_step_epochs=1)
    history = train(cfg, progress=False).history
    assert [m["lr"] for m in history] == pytest.approx([1e-3, 5e-4])


def test_a_plateau_run_refuses_a_selection_metric_it_does_not_report(synth_cache, tmp_path):
    cfg = tiny_run_config(synth_cache, tmp_path, epochs=1, lr_schedule="plateau", lr_decay=0.5)
    with pytest.raises(ConfigError, match=r"train.lr_schedule: plateau follows the selection metric 'val_rpa'"):
        train(cfg, progress=False, select=("val_rpa", "max"))  # the decoder stage has no F0 estimate


def test_a_plateau_run_does_not_resume_a_checkpoint_without_its_state(synth_cache, tmp_path):
    train(tiny_run_config(synth_cache, tmp_path, epochs=1), progress=False)
    cfg = tiny_run_config(synth_cache, tmp_path, epochs=2, lr_schedule="plateau", lr_decay=0.5)
    with pytest.raises(CheckpointError, match=r"holds no plateau schedule state \(its schedule: exponential\)"):
        train(cfg, progress=False)
