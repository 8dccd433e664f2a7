"""Random training crops: a clip read a (seed, epoch)-drawn number of frames later in its file, the
same draw on every resume; validation and test clips stay where they are."""
import torch

from diffcraft import CLIP_FRAMES, HOP_LENGTH
from diffcraft.data.dataset import ClipDataset
from diffcraft.train.data import CroppedClips, EpochSampler, make_loaders
from tests.conftest import tiny_run_config


def test_a_window_is_the_stretch_of_the_recording_across_the_next_clip(synth_cache):
    clips = ClipDataset(synth_cache, "train")
    i = next(k for k in range(len(clips) - 1) if clips.index[k][0] == clips.index[k + 1][0])  # a next clip exists
    assert all(torch.equal(clips.window(i, 0)[k], v) for k, v in clips[i].items())
    window, a, b = clips.window(i, 100), clips[i], clips[i + 1]
    assert torch.equal(window["audio"], torch.cat([a["audio"][100 * HOP_LENGTH:], b["audio"][:100 * HOP_LENGTH]]))
    for key in ("f0_hz", "voicing", "loudness_db"):
        assert torch.equal(window[key], torch.cat([a[key][100:], b[key][:100]])) and window[key].shape == a[key].shape
    last = max(k for k in range(len(clips)) if clips.index[k][0] == clips.index[i][0])
    assert torch.equal(clips.window(last, 250)["audio"], clips[last]["audio"])  # nothing after it to move into


def test_offsets_follow_seed_and_epoch_and_leave_the_order_alone():
    def draw(epoch, crops=True, seed=3, rank=0, world=1):
        sampler = EpochSampler(12, 12, False, seed, rank, world, crops)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = draw(2)
    assert first == draw(2) and [i for i, _ in first] == draw(2, crops=False)
    assert [o for _, o in first] != [o for _, o in draw(3)] and all(0 <= o < CLIP_FRAMES for _, o in first)
    assert sorted(draw(2, rank=0, world=2) + draw(2, rank=1, world=2)) == sorted(first)


def test_only_the_training_loader_crops(synth_cache, tmp_path):
    cfg = tiny_run_config(synth_cache, tmp_path)
    cfg.data.random_crops = True
    train_loader, val_loader = make_loaders(cfg)
    assert isinstance(train_loader.dataset, CroppedClips) and isinstance(val_loader.dataset, ClipDataset)
    assert next(iter(train_loader))["audio"].shape == (2, CLIP_FRAMES * HOP_LENGTH)
