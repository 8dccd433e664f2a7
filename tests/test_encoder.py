import itertools

import numpy as np
import pytest
import torch

from diffcraft.losses import f0_loss, kl_beta, kl_per_dim, kl_with_free_bits
from diffcraft.models.encoders import AudioEncoder, EncoderConfig
from diffcraft.nn import CORES
from diffcraft.train.metrics import active_units
from tests.conftest import sine


@pytest.mark.parametrize("encoding,latent,core", list(itertools.product(["dual", "separate"],
                                                                        ["deterministic", "vae"], CORES)))
def test_encoder_shapes_for_every_combination(encoding, latent, core):
    cfg = EncoderConfig(encoding=encoding, latent=latent, core=core, width=16, latent_size=4, head_width=8)
    audio = torch.from_numpy(np.stack([sine(220, 1.0), sine(440, 1.0)]))
    out = AudioEncoder(cfg)(audio)
    assert out["f0_logits"].shape == (2, 100, 435)
    assert out["f0_hz"].shape == (2, 100) and out["loudness_db"].shape == (2, 100)
    names = {"shared"} if encoding == "dual" else {"f0", "loudness"}
    assert set(out["latents"]) == names
    for head in out["latents"].values():
        assert head["z"].shape == (2, 100, 4)
        assert ("logvar" in head) == (latent == "vae")


def test_f0_loss_ignores_unvoiced_frames():
    torch.manual_seed(0)
    f0 = torch.full((1, 10), 300.0)
    voiced = torch.tensor([[True] * 5 + [False] * 5])
    logits = torch.randn(1, 10, 435)
    changed = logits.clone()
    changed[:, 5:] = 50.0
    assert f0_loss(logits, f0, voiced) == f0_loss(changed, f0, voiced)
    assert f0_loss(logits, f0, voiced) != f0_loss(logits, f0, torch.ones_like(voiced))


def test_kl_schedules_hit_their_planned_values():
    assert kl_beta(0, "constant", 0.5) == 0.5
    assert kl_beta(0, "linear", 1.0, 0.0, 100) == 0.0
    assert kl_beta(50, "linear", 1.0, 0.0, 100) == pytest.approx(0.5)
    assert kl_beta(100, "linear", 1.0, 0.0, 100) == 1.0 and kl_beta(5000, "linear", 1.0, 0.0, 100) == 1.0
    # 4 cycles of 250 steps over 1000, rising over the first half of each
    values = [kl_beta(s, "cyclical", 2.0, 0.0, cycles=4, ratio=0.5, total_steps=1000) for s in range(1000)]
    assert values[0] == 0.0 and values[250] == 0.0 and values[750] == 0.0
    assert values[62] == pytest.approx(2.0 * 62 / 125)
    assert values[125] == 2.0 and values[249] == 2.0 and values[999] == 2.0
    with pytest.raises(ValueError, match="'cosine' is not"):
        kl_beta(0, "cosine", 1.0)


def test_kl_per_dimension_and_free_bits():
    mu = torch.zeros(2, 10, 3)
    mu[..., 0] = 1.0
    logvar = torch.zeros(2, 10, 3)
    kl = kl_per_dim(mu, logvar)
    assert kl.tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert kl_with_free_bits(kl, 0.25).item() == pytest.approx(1.0)
    assert kl_with_free_bits(kl, 0.0).item() == pytest.approx(0.5)


def test_active_units_zero_for_a_collapsed_encoder_full_for_a_healthy_one():
    torch.manual_seed(0)
    cfg = EncoderConfig(encoding="separate", latent="vae", core="gru", width=32, latent_size=6, head_width=16)
    encoder = AudioEncoder(cfg).eval()
    tones = np.stack([sine(f, 1.0, a) for f, a in [(200, 0.5), (400, 0.1), (800, 0.3), (300, 0.7)]])
    noise = np.random.default_rng(0).standard_normal(tones.shape).astype(np.float32)
    audio = torch.from_numpy(tones + noise * np.array([[0.01], [0.2], [0.05], [0.1]], np.float32))
    with torch.no_grad():
        for head in encoder.heads.values():  # a healthy posterior: means that move with the input
            head.proj.weight.mul_(30.0)
        healthy = encoder.latents(audio)
        count, variance = active_units(torch.cat([h["mu"] for h in healthy.values()], -1))
        assert count == 12 and (variance > 0.01).all()
        for head in encoder.heads.values():  # collapse on purpose: the posterior ignores the input
            head.proj.weight.zero_()
        collapsed = encoder.latents(audio)
        count, _ = active_units(torch.cat([h["mu"] for h in collapsed.values()], -1))
    assert count == 0
