"""bf16 autocast works for every stage, latent and core: a training step, a validation (the shuffle
gap runs the decoders again on z), a checkpoint and a resume, each in bfloat16 on the CPU."""
import math

import pytest

from diffcraft.nn import CORES
from diffcraft.train.checkpoint import load_checkpoint
from diffcraft.train.loop import train
from tests.conftest import tiny_run_config

ENCODER = {"width": 16, "latent_size": 4, "head_width": 16}
# (stage, latent, encoding): the encoder's two encodings split between the latents and stages
STAGES = [("decoder", None, None), ("encoder", "deterministic", "dual"), ("encoder", "vae", "separate"),
          ("joint", "deterministic", "separate"), ("joint", "vae", "dual")]


def bf16_config(cache, out_dir, stage, latent, encoding, core, epochs, device="cpu"):
    cfg = tiny_run_config(cache, out_dir, precision="bf16", device=device, epochs=epochs)
    cfg.model.stage = stage
    cfg.model.decoder.core = core
    if latent:
        cfg.model.encoder.latent, cfg.model.encoder.encoding, cfg.model.encoder.core = latent, encoding, core
        for name, value in ENCODER.items():
            setattr(cfg.model.encoder, name, value)
    return cfg


FAST = {("decoder", "mamba"), ("encoder", "gru"), ("joint", "bimamba")}  # the rest of the matrix is marked slow
CASES = [pytest.param(*stage, core, id=f"{stage[0]}-{stage[1]}-{core}",
                      marks=() if (stage[0], core) in FAST and stage[1] != "deterministic" else pytest.mark.slow)
         for stage in STAGES for core in CORES]


@pytest.mark.parametrize("stage, latent, encoding, core", CASES)
def test_bf16_trains_validates_checkpoints_and_resumes(synth_cache, tmp_path, stage, latent, encoding, core):
    train(bf16_config(synth_cache, tmp_path, stage, latent, encoding, core, epochs=1), progress=False)
    resumed = train(bf16_config(synth_cache, tmp_path, stage, latent, encoding, core, epochs=2), progress=False)
    assert [m["epoch"] for m in resumed.history] == [0, 1] and resumed.step == 4
    last = resumed.history[-1]
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["val_loss"])
    if latent:
        assert math.isfinite(last["val_shuffle_gap"])
    state = load_checkpoint(tmp_path / "tiny" / "checkpoints" / "last.pt")
    assert state["config"]["train"]["precision"] == "bf16" and state["epoch"] == 1
    assert state["scan"] == ("fused" if "mamba" in core else "none")
