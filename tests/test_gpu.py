"""What only a GPU shows (`python -m pytest -m gpu`; skipped without CUDA): a run trained and
resumed on CUDA, bf16 for every stage and core on CUDA, each CUDA scan against the plain
recurrence, and one pass of the decoder benchmark. This module imports neither Ray nor MLflow, so a
bare GPU machine runs it with the project on its path (../shared/gpu/README.md); there the feature
cache comes from DIFFCRAFT_TEST_CACHE (one made by `diffcraft data prepare` elsewhere)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcraft.nn import CORES, Mamba
from diffcraft.nn import scan as scan_module
from diffcraft.nn.scan import selective_scan
from diffcraft.train.checkpoint import load_checkpoint
from diffcraft.train.loop import train
from tests.conftest import tiny_run_config
from tests.test_precision import STAGES, bf16_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA_SCANS = ["triton"] + (["mamba_ssm"] if scan_module._import_error("mamba_ssm") is None else [])


@pytest.fixture(scope="module")
def gpu_cache(request):
    return os.environ.get("DIFFCRAFT_TEST_CACHE") or request.getfixturevalue("synth_cache")


def test_a_cuda_run_trains_and_resumes(gpu_cache, tmp_path):
    def config(epochs):
        cfg = tiny_run_config(gpu_cache, tmp_path, device="cuda", epochs=epochs)
        cfg.model.decoder.core = "mamba"
        return cfg

    train(config(1), progress=False)
    resumed = train(config(2), progress=False)
    assert [m["epoch"] for m in resumed.history] == [0, 1] and resumed.step == 4
    state = load_checkpoint(tmp_path / "tiny" / "checkpoints" / "last.pt")
    assert state["rng"]["cuda"].device.type == "cpu" and state["rng"]["cuda"].dtype == torch.uint8
    assert state["scan"] in CUDA_SCANS


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("stage, latent, encoding", STAGES, ids=lambda v: str(v))
def test_bf16_on_cuda_trains_and_resumes(gpu_cache, tmp_path, stage, latent, encoding, core):
    train(bf16_config(gpu_cache, tmp_path, stage, latent, encoding, core, 1, "cuda"), progress=False)
    resumed = train(bf16_config(gpu_cache, tmp_path, stage, latent, encoding, core, 2, "cuda"), progress=False)
    assert [m["epoch"] for m in resumed.history] == [0, 1]
    assert all(torch.isfinite(torch.tensor(m["val_loss"])) for m in resumed.history)


@pytest.mark.parametrize("impl", CUDA_SCANS)
def test_cuda_scan_equals_the_recurrence(impl):
    g = torch.Generator().manual_seed(0)
    batch, length, d_inner, n_state = 2, 400, 96, 16
    inputs = [torch.randn(batch, length, d_inner, generator=g), torch.randn(batch, length, d_inner, generator=g) - 1,
              -torch.rand(d_inner, n_state, generator=g) * 4, torch.randn(batch, length, n_state, generator=g),
              torch.randn(batch, length, n_state, generator=g), torch.randn(d_inner, generator=g),
              torch.randn(batch, length, d_inner, generator=g), torch.randn(d_inner, generator=g) * 0.5]
    kernel_in = [t.cuda().requires_grad_() for t in inputs]
    plain_in = [t.cuda().requires_grad_() for t in inputs]
    out, plain = selective_scan(*kernel_in, impl=impl), selective_scan(*plain_in, impl="reference")
    assert torch.allclose(out, plain, atol=1e-4, rtol=1e-4)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (plain * weights).sum().backward()
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), kernel_in, plain_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-3, rtol=1e-3), name


@pytest.mark.parametrize("impl", CUDA_SCANS)
def test_a_mamba_block_runs_in_bf16_on_every_cuda_scan(impl):
    """Under autocast the convolution's output is float32 beside bfloat16 projections; mamba_ssm's
    kernel refused that mix ("Expected delta.scalar_type() == input_type")."""
    torch.manual_seed(0)
    block = Mamba(64, impl=impl).cuda()
    plain = Mamba(64, impl="reference").cuda()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 400, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(x)
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())
    assert torch.allclose(y.float(), plain(x), atol=0.05, rtol=0.05)


def test_the_decoder_benchmark_runs_on_cuda():
    script = Path(__file__).parents[1] / "benchmarks" / "decoders.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cuda", "--steps", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split()[0] for line in done.stdout.splitlines() if line.split() and line.split()[0] in CORES]
    assert rows == list(CORES)


def test_a_joint_vae_training_step_never_waits_for_the_gpu(gpu_cache, tmp_path):
    """The host must queue step after step: any synchronisation inside a step (a copy from host
    memory, an .item()) raises here. The loop reads its losses only every CHECK_EVERY steps."""
    from diffcraft.train.loop import start, train_step
    from diffcraft.train.session import Session

    cfg = bf16_config(gpu_cache, tmp_path, "joint", "vae", "separate", "bimamba", 1, "cuda")
    cfg.train.precision = "fp32"
    run = start(cfg, Session(torch.device("cuda")))
    batch = {k: v.cuda() for k, v in next(iter(run.train_loader)).items()}
    train_step(run, batch, 1e-3)  # warm-up: kernels compiled, caches filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_step(run, batch, 1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
