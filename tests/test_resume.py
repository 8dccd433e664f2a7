"""A resumed run draws exactly what the uninterrupted run draws: the same clips per epoch, the same
noise, the same weights at the end; evaluation leaves the training streams alone."""
import torch

from diffcraft.train.checkpoint import load_checkpoint
from diffcraft.train.evaluate import seeded
from diffcraft.train.loop import train
from tests.conftest import tiny_run_config


def test_two_epochs_after_a_resume_match_the_same_epochs_without_it(synth_cache, tmp_path):
    straight = tiny_run_config(synth_cache, tmp_path / "straight", epochs=3)
    train(straight, progress=False)
    interrupted = tiny_run_config(synth_cache, tmp_path / "resumed", epochs=1)
    train(interrupted, progress=False)
    interrupted.train.epochs = 3
    train(interrupted, progress=False)  # resumes after epoch 0 from last.pt
    a = load_checkpoint(tmp_path / "straight" / "tiny" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "tiny" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
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
