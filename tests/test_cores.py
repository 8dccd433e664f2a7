import pytest
import torch

from diffcraft.nn import CORES, Mamba, make_core
from diffcraft.nn.conv import causal_conv_silu
from diffcraft.nn.scan import selective_scan

# mamba_ssm.modules.mamba_simple.Mamba(d_model=64) state_dict: names and shapes
MAMBA_SSM_KEYS = {
    "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
    "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
    "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128),
}


def test_mamba_state_dict_matches_mamba_ssm_layout():
    shapes = {k: tuple(v.shape) for k, v in Mamba(64).state_dict().items()}
    assert shapes == MAMBA_SSM_KEYS
    assert sum(p.numel() for p in Mamba(512).parameters()) == 1_694_720


@pytest.mark.parametrize("name", CORES)
def test_every_core_maps_input_to_width(name):
    core = make_core(name, 24, 16)
    assert core(torch.randn(3, 50, 24)).shape == (3, 50, 16)


def test_fused_scan_equals_step_by_step_recurrence_in_value_and_gradients():
    torch.manual_seed(0)
    batch, d_inner, length, n_state = 2, 45, 53, 8  # 45 channels: one full block and a partial one
    inputs = [torch.randn(batch, length, d_inner), torch.randn(batch, length, d_inner) - 1.0,
              -torch.rand(d_inner, n_state) * 4, torch.randn(batch, length, n_state),
              torch.randn(batch, length, n_state), torch.randn(d_inner),
              torch.randn(batch, length, d_inner), torch.randn(d_inner) * 0.5]
    fused_in = [t.clone().requires_grad_() for t in inputs]
    plain_in = [t.clone().requires_grad_() for t in inputs]
    fused = selective_scan(*fused_in, impl="fused")
    plain = selective_scan(*plain_in, impl="reference")
    assert torch.allclose(fused, plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(fused)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    for a, b in zip(fused_in, plain_in):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "conv1d"])
@pytest.mark.parametrize("length", [2, 37])  # shorter than the taps; a full block and a partial one
def test_causal_conv_equals_conv1d_in_value_and_gradients(length, impl):
    torch.manual_seed(0)
    channels, taps = 150, 4
    conv = torch.nn.Conv1d(channels, channels, taps, groups=channels, padding=taps - 1)
    xz = torch.randn(3, length, 2 * channels)
    x_fused, x_plain = xz.clone().requires_grad_(), xz.clone().requires_grad_()
    weight, bias = (p.detach().clone().requires_grad_() for p in (conv.weight, conv.bias))
    fused = causal_conv_silu(x_fused[..., :channels], weight, bias, impl=impl)  # a strided view
    plain = torch.nn.functional.silu(conv(x_plain[..., :channels].transpose(1, 2))[..., :length])
    plain = plain.transpose(1, 2)
    assert torch.allclose(fused, plain, atol=1e-6)
    weights = torch.randn_like(fused)
    (fused * weights).sum().backward()
    (plain * weights).sum().backward()
    assert torch.allclose(x_fused.grad, x_plain.grad, atol=1e-5)
    assert torch.allclose(weight.grad, conv.weight.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(bias.grad, conv.bias.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["fused", "triton"])  # triton: compiled on a GPU, else interpreted on CPU
def test_mamba_module_on_a_kernel_equals_reference_path(impl):
    if impl == "triton":
        pytest.importorskip("triton")
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    kernel, plain = Mamba(32, impl=impl).to(device), Mamba(32, impl="reference").to(device)
    plain.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 21 if impl == "triton" else 40, 32, device=device)  # the interpreter is slow
    a, b = kernel(x), plain(x)
    assert torch.allclose(a, b, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(kernel.named_parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name


def outputs_before_a_change_at_frame_20(name):
    """The core's first 20 output frames for two inputs that differ only from frame 20 on."""
    torch.manual_seed(0)
    core = make_core(name, 8, 8)
    x = torch.randn(1, 30, 8)
    y = x.clone()
    y[:, 20:] = torch.randn(1, 10, 8)
    return core(x), core(y)


@pytest.mark.parametrize("name", ["gru", "mamba"])
def test_unidirectional_cores_are_causal(name):
    a, b = outputs_before_a_change_at_frame_20(name)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-6)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


@pytest.mark.parametrize("name", ["bigru", "bimamba"])
def test_bidirectional_cores_see_the_future(name):
    a, b = outputs_before_a_change_at_frame_20(name)
    assert not torch.allclose(a[:, :20], b[:, :20])


def test_unknown_core_is_named():
    with pytest.raises(ValueError, match="'lstm' is not one of"):
        make_core("lstm", 4, 4)
