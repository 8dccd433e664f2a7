"""The Triton selective scan against the plain recurrence: outputs and every gradient, odd lengths,
a state size that is not a power of two, several channel blocks; and the choice of scan. Compiled on
a GPU; elsewhere run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest where there is no GPU)."""
import pytest
import torch

from diffcraft.errors import ConfigError
from diffcraft.nn import scan as scan_module
from diffcraft.nn.scan import announce_scan, kernel_dtype, resolve_scan, selective_scan

pytest.importorskip("triton")
from diffcraft.nn.scan_triton import TritonScan  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan_inputs(batch, length, d_inner, n_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, length, d_inner, generator=g), torch.randn(batch, length, d_inner, generator=g) - 1.0,
              -torch.rand(d_inner, n_state, generator=g) * 4, torch.randn(batch, length, n_state, generator=g),
              torch.randn(batch, length, n_state, generator=g), torch.randn(d_inner, generator=g),
              torch.randn(batch, length, d_inner, generator=g), torch.randn(d_inner, generator=g) * 0.5]
    return [t.to(DEVICE) for t in inputs]


@pytest.mark.parametrize("batch, length, d_inner, n_state, block_d", [
    (2, 37, 45, 8, 16),  # a length that is no multiple of the chunk; a full block and a partial one
    (1, 1, 20, 16, 32),  # one step
    (2, 17, 33, 5, 8),  # a state size that is not a power of two; five blocks
])
def test_triton_scan_equals_the_recurrence_in_value_and_every_gradient(batch, length, d_inner, n_state, block_d):
    inputs = scan_inputs(batch, length, d_inner, n_state)
    kernel_in = [t.clone().requires_grad_() for t in inputs]
    plain_in = [t.clone().requires_grad_() for t in inputs]
    u, delta, A, Bm, Cm, D, z, bias = kernel_in
    out = TritonScan.apply(u, delta, bias, A, Bm, Cm, D, z, block_d)
    plain = selective_scan(*plain_in, impl="reference")
    assert torch.allclose(out, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (plain * weights).sum().backward()
    for name, a, b in zip(NAMES, kernel_in, plain_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_under_autocast_the_triton_kernel_gets_one_dtype_and_matches_float32():
    """Autocast leaves the scan's inputs mixed (the convolution's float32 beside bfloat16
    projections); mamba_ssm's kernel refused that. Every kernel input is cast to bfloat16."""
    inputs = scan_inputs(2, 19, 24, 8, seed=3)
    mixed = [t.to(torch.bfloat16) if i in (1, 3, 4, 6) else t for i, t in enumerate(inputs)]  # delta, B, C, z
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert kernel_dtype(mixed[0], mixed[1], mixed[6], mixed[3], mixed[4]) == torch.bfloat16
        out = selective_scan(*[t.clone().requires_grad_() for t in mixed], impl="triton")
    assert kernel_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)) == torch.float32  # no autocast
    assert out.dtype == torch.bfloat16
    plain = selective_scan(*inputs, impl="reference")
    assert torch.allclose(out.float(), plain, atol=0.1, rtol=0.05)


def test_auto_picks_by_device_and_says_why():
    assert resolve_scan("auto", "cpu") == ("fused", "numba kernels on CPU")
    name, why = resolve_scan("auto", "cuda")
    if scan_module._import_error("mamba_ssm"):
        assert name == "triton" and "mamba_ssm not importable" in why and scan_module._import_error("mamba_ssm") in why
    else:
        assert name == "mamba_ssm"


@pytest.mark.skipif(scan_module._import_error("mamba_ssm") is None, reason="mamba_ssm is importable here")
def test_mamba_ssm_asked_for_but_missing_shows_the_import_error():
    with pytest.raises(ConfigError, match=r"scan 'mamba_ssm' was asked for but cannot be imported \(.*mamba_ssm"):
        resolve_scan("mamba_ssm", "cuda")


def test_kernels_refuse_devices_they_do_not_run_on():
    with pytest.raises(ConfigError, match="scan 'fused' runs on cpu, not on cuda"):
        resolve_scan("fused", "cuda")
    with pytest.raises(ConfigError, match="'fast' is not one of"):
        resolve_scan("fast", "cpu")


def test_the_scan_is_said_once_per_process_and_device(capsys, monkeypatch):
    monkeypatch.setattr(scan_module, "_announced", set())
    assert announce_scan("cpu") == "fused"
    announce_scan("cpu")
    assert capsys.readouterr().err.count("diffcraft: Mamba scan on cpu: fused (numba kernels on CPU)") == 1
