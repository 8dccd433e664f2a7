"""A resumed run draws exactly what the uninterrupted run draws: the same clips per epoch, the same
noise, the same learning rates, the same weights at the end; evaluation leaves the training
streams alone."""
import pytest
import torch

from diffcraft.train.checkpoint import load_checkpoint, set_rng_state
from diffcraft.train.evaluate import seeded
from diffcraft.train.loop import start, train
from diffcraft.train.session import LocalSession
from tests.conftest import tiny_run_config


@pytest.mark.parametrize("crops", [False, True])
def test_two_epochs_after_a_resume_match_the_same_epochs_without_it(synth_cache, tmp_path, crops):
    straight = tiny_run_config(synth_cache, tmp_path / "straight", epochs=3)
    straight.data.random_crops = crops
    train(straight, progress=False)
    interrupted = tiny_run_config(synth_cache, tmp_path / "resumed", epochs=1)
    interrupted.data.random_crops = crops
    train(interrupted, progress=False)
    interrupted.train.epochs = 3
    train(interrupted, progress=False)  # resumes after epoch 0 from last.pt
    a = load_checkpoint(tmp_path / "straight" / "tiny" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "tiny" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    assert [m["train_loss"] for m in a["history"]] == [m["train_loss"] for m in b["history"]]


def test_a_plateau_schedule_resumes_where_it_stood(synth_cache, tmp_path):
    """The selection metric 'epoch' (min) never improves after epoch 0, so with patience 0 the
    learning rate halves after epochs 1 and 2; a resume after epoch 0 must remember that epoch 0
    was the best, or epoch 1 would count as an improvement and the rates would part."""
    plateau = {"epochs": 3, "lr_schedule": "plateau", "lr_decay": 0.5, "lr_plateau_patience": 0}
    never_improves = ("epoch", "min")
    straight = tiny_run_config(synth_cache, tmp_path / "straight", **plateau)
    train(straight, progress=False, select=never_improves)
    interrupted = tiny_run_config(synth_cache, tmp_path / "resumed", **{**plateau, "epochs": 1})
    train(interrupted, progress=False, select=never_improves)
    interrupted.train.epochs = 3
    train(interrupted, progress=False, select=never_improves)
    a = load_checkpoint(tmp_path / "straight" / "tiny" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "tiny" / "checkpoints" / "last.pt")
    assert [m["lr"] for m in a["history"]] == [m["lr"] for m in b["history"]] == [1e-3, 1e-3, 5e-4]
    assert a["lr_schedule"] == b["lr_schedule"] and a["lr_schedule"]["plateau"]["best"] == 0
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"] == 2.5e-4
    for name, weight in a["model"].items():
        assert torch.equal(weight, b["model"][name]), name
    assert [m["train_loss"] for m in a["history"]] == [m["train_loss"] for m in b["history"]]


def test_seeded_draws_repeat_and_leave_the_callers_stream_untouched():
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    with seeded(0):
        first = torch.rand(3)
    with seeded(0):
        second = torch.rand(3)
    assert torch.equal(first, second)
    assert torch.equal(torch.rand(4), expected_next)


class OtherDeviceSession(LocalSession):
    """A run whose device is not the CPU (meta: tensors without data, enough to see where each lands)."""

    def __init__(self, run_dir):
        super().__init__(run_dir, torch.device("meta"))


def tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


def test_a_checkpoint_restores_to_the_cpu_whatever_device_the_run_is_on(synth_cache, tmp_path):
    """A GPU run could not resume: its checkpoint was loaded onto the GPU, RNG states included."""
    train(tiny_run_config(synth_cache, tmp_path), progress=False)
    state = OtherDeviceSession(tmp_path / "tiny").restore()
    assert {t.device.type for t in tensors_in(state)} == {"cpu"}
    set_rng_state(state["rng"], torch.device("meta"))  # a CPU byte tensor, as torch wants it


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_a_resumed_run_moves_its_model_before_loading_the_optimizer_state(synth_cache, tmp_path):
    """The optimizer's moments follow the weights onto the run's device: none is left behind."""
    train(tiny_run_config(synth_cache, tmp_path), progress=False)
    run = start(tiny_run_config(synth_cache, tmp_path, epochs=3), OtherDeviceSession(tmp_path / "tiny"))
    assert run.start_epoch == 2
    assert {p.device.type for p in run.model.parameters()} == {"meta"}
    moments = [t for s in run.optimizer.state.values() for k, t in s.items() if k != "step"]
    assert moments and {t.device.type for t in moments} == {"meta"}
