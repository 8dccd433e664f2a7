import pytest
import torch

from diffcraft.data.dataset import ClipDataset
from diffcraft.losses import MultiScaleSpectralLoss
from diffcraft.models.decoder import DDSPDecoder, DecoderConfig
from diffcraft.nn import CORES


def test_default_decoder_is_the_published_ddsp_size():
    model = DDSPDecoder(DecoderConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 4.8e6 < n < 4.9e6  # magenta's solo-instrument decoder (~4.80 M) + a 3 s reverb IR
    out = model(200 + torch.rand(2, 400) * 100, torch.full((2, 400), -30.0))
    assert out["audio"].shape == (2, 64000) and out["distribution_raw"].shape == (2, 400, 100)


@pytest.mark.slow  # 15-100 s per core here (250 steps; the Mamba cores compile numba kernels first)
@pytest.mark.parametrize("core", CORES)
def test_decoder_overfits_one_clip_for_every_core(core, synth_cache):
    torch.manual_seed(0)
    clip = ClipDataset(synth_cache, "train")[0]
    f0, loud, audio = clip["f0_hz"][None], clip["loudness_db"][None], clip["audio"][None]
    model = DDSPDecoder(DecoderConfig(core=core, width=64, mlp_layers=2, n_harmonics=40,
                                      reverb_seconds=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = MultiScaleSpectralLoss()
    with torch.no_grad():
        torch.manual_seed(1)
        first = loss_fn(model(f0, loud)["audio"], audio).item()
    for _ in range(250):
        loss = loss_fn(model(f0, loud)["audio"], audio)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        torch.manual_seed(1)
        last = loss_fn(model(f0, loud)["audio"], audio).item()
    assert last < 0.5 * first, f"{core}: MSS {first:.3f} -> {last:.3f}"
