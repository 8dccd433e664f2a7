import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from diffcraft.errors import CheckpointError, ConfigError
from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint
from diffcraft.train.config import load_run_config
from diffcraft.train.loop import train
from tests.conftest import tiny_run_config


def test_training_writes_metrics_and_checkpoints(synth_cache, tmp_path):
    seen = []
    result = train(tiny_run_config(synth_cache, tmp_path), progress=False,
                   on_epoch=lambda metrics, path: seen.append((metrics["epoch"], path.name)))
    assert [h["epoch"] for h in result.history] == [0, 1] and result.step == 4
    assert seen == [(0, "last.pt"), (1, "last.pt")]
    metrics = result.history[-1]
    for key in ("train_mss", "val_mss_mean", "val_mss_se", "val_mss_sd", "audio_seconds_per_second"):
        assert metrics[key] > 0
    state = load_checkpoint(tmp_path / "tiny" / "checkpoints" / "best.pt")
    assert state["config"]["model"]["decoder"]["core"] == "gru" and state["epoch"] in (0, 1)


def test_a_finished_run_continues_when_given_more_epochs(synth_cache, tmp_path):
    train(tiny_run_config(synth_cache, tmp_path), progress=False)
    more = train(tiny_run_config(synth_cache, tmp_path, epochs=3), progress=False)
    assert [h["epoch"] for h in more.history] == [0, 1, 2] and more.step == 6


def test_killed_run_resumes_with_the_same_step_count(synth_cache, tmp_path):
    config = tmp_path / "run.yaml"
    cfg = {"name": "killed", "out_dir": str(tmp_path),
           "data": {"cache": str(synth_cache), "batch_size": 2, "clips_per_epoch": 12},
           "model": {"decoder": {"core": "mamba", "width": 48, "n_harmonics": 24, "reverb_seconds": 0.1}},
           "train": {"epochs": 4}}
    config.write_text(yaml.safe_dump(cfg))
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-m", "diffcraft.cli", "train", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["epoch"]
    assert killed_at < 3, "the run finished before it could be killed"
    done = subprocess.run([sys.executable, "-m", "diffcraft.cli", "train", str(config)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"resuming {tmp_path / 'killed'} after epoch {killed_at}" in done.stdout
    state = load_checkpoint(last)
    assert state["step"] == 4 * 6 and [h["epoch"] for h in state["history"]] == [0, 1, 2, 3]
    assert not list(last.parent.glob(".*tmp*"))


def test_config_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs: expected an integer, got 'three'"):
        load_run_config(path)
    path.write_text("model:\n  decoder:\n    core: lstm\n")
    with pytest.raises(ConfigError, match=r"model.decoder.core: 'lstm' is not one of"):
        load_run_config(path)
    path.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown field train.learning_rate"):
        load_run_config(path)
    assert load_run_config(path=None, overrides=["train.lr=1e-3"]).train.lr == 1e-3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_loading_refuses_code_and_names_corrupt_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "diffcraft-checkpoint", "payload": _Exploit()}, evil)
    with pytest.raises(CheckpointError, match="could execute code"):
        load_checkpoint(evil)
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(3)}})
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt.pt: corrupt or truncated"):
        load_checkpoint(corrupt)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        load_checkpoint(plain)
    assert torch.equal(load_checkpoint(good)["model"]["w"], torch.ones(3))


def test_bf16_training_on_cpu_gives_finite_losses_close_to_fp32(synth_cache, tmp_path):
    """`precision: bf16` autocasts the networks on the CPU (synthesis and loss stay float32):
    the same seeded run's losses are finite and within a few percent of fp32's."""
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_run_config(synth_cache, tmp_path / precision, precision=precision, device="cpu")
        runs[precision] = train(cfg, progress=False).history
    for precision, history in runs.items():
        assert load_checkpoint(tmp_path / precision / "tiny" / "checkpoints" / "last.pt")["config"]["train"][
            "precision"] == precision
        for epoch in history:
            assert all(math.isfinite(epoch[k]) for k in ("train_mss", "train_loss", "val_mss_mean", "val_loss"))
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"]):
        for key in ("train_mss", "val_mss_mean"):
            assert bf16[key] == pytest.approx(fp32[key], rel=0.05), (key, fp32[key], bf16[key])
    assert runs["bf16"][-1]["train_mss"] != runs["fp32"][-1]["train_mss"]  # autocast did run in bf16
