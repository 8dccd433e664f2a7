"""What a training run reads: the clip loaders, and the sampler that gives every epoch its order
(and, with `data.random_crops`, each training clip's offset; validation and test clips stay fixed).

An epoch's order depends only on (seed, epoch), so a resumed run draws exactly what it would have
drawn without the interruption, and data-parallel ranks agree on it without talking: each keeps
every world-th clip from its rank on. The global batch is `data.batch_size` whatever the number of
workers; each rank takes its share. For a GPU, batches come from worker processes that stay up
between epochs, in pinned memory, so the copy to the device overlaps the step.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from diffcraft import CLIP_FRAMES
from diffcraft.data.dataset import ClipDataset
from diffcraft.errors import ConfigError

EPOCH_SEED_STRIDE = 1_000_003  # a prime: (seed, epoch) pairs map to distinct generator seeds


class EpochSampler(Sampler):
    """Indices of one epoch for one rank: a permutation (or draws with replacement when the
    epoch is a fixed number of clips) seeded by (seed, epoch), sharded rank::world. With `crops`,
    (index, frame offset) pairs: the offsets are drawn after the order, from the same generator,
    so the order is the one without crops."""

    def __init__(self, n_items: int, n_samples: int, replacement: bool, seed: int, rank: int = 0, world: int = 1,
                 crops: bool = False):
        self.n_items, self.n_samples, self.replacement = n_items, n_samples, replacement
        self.seed, self.rank, self.world, self.epoch, self.crops = seed, rank, world, 0, crops

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
        if self.replacement:
            order = torch.randint(self.n_items, (self.n_samples,), generator=generator)
        else:
            order = torch.randperm(self.n_items, generator=generator)[: self.n_samples]
        usable = len(order) - len(order) % self.world
        mine = order[self.rank: usable: self.world].tolist()
        if not self.crops:
            return iter(mine)
        offsets = torch.randint(CLIP_FRAMES, (len(order),), generator=generator)[self.rank: usable: self.world]
        return iter(zip(mine, offsets.tolist()))

    def __len__(self) -> int:
        return self.n_samples // self.world


class CroppedClips(Dataset):
    """A split's clips read at the (index, frame offset) pairs an EpochSampler with crops yields."""

    def __init__(self, clips: ClipDataset):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.clips.window(*item)


def rank_batch_size(batch_size: int, world: int) -> int:
    """Each rank's share of the global batch; the global batch must split evenly."""
    if batch_size % world:
        raise ConfigError(f"data.batch_size: {batch_size} does not split evenly over {world} workers")
    return batch_size // world


GPU_LOADER_WORKERS = 2  # `data.num_workers: -1` on a GPU: clips are small arrays, two keep ahead of a step


def loader_options(num_workers: int, device: torch.device | str = "cpu") -> dict:
    """DataLoader options for `data.num_workers` (-1: automatic) on `device`."""
    on_gpu = torch.device(device).type == "cuda"
    workers = (GPU_LOADER_WORKERS if on_gpu else 0) if num_workers < 0 else num_workers
    return {"num_workers": workers, "pin_memory": on_gpu, "persistent_workers": workers > 0}


def make_loaders(cfg, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu") -> tuple[DataLoader, DataLoader]:
    """(training loader with an EpochSampler, validation loader) for a RunConfig on `device`."""
    train_set = ClipDataset(cfg.data.cache, "train")
    val_set = ClipDataset(cfg.data.cache, "validation")
    if cfg.data.validation_clips and cfg.data.validation_clips < len(val_set):
        val_set = Subset(val_set, range(cfg.data.validation_clips))
    n_train = cfg.data.clips_per_epoch or len(train_set)
    sampler = EpochSampler(len(train_set), n_train, bool(cfg.data.clips_per_epoch), cfg.train.seed, rank, world,
                           cfg.data.random_crops)
    batch = min(rank_batch_size(cfg.data.batch_size, world), max(1, len(sampler)))
    options = loader_options(cfg.data.num_workers, device)
    train_loader = DataLoader(CroppedClips(train_set) if cfg.data.random_crops else train_set, batch_size=batch,
                              sampler=sampler, drop_last=True, **options)
    val_loader = DataLoader(val_set, batch_size=cfg.data.batch_size, **options)
    return train_loader, val_loader
