"""Reading the feature cache: clips as memory-mapped arrays, no audio decoding at training time."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffcraft import CLIP_FRAMES, HOP_LENGTH
from diffcraft.data.cache import ARRAYS, local_cache, require_manifest
from diffcraft.data.splits import SPLITS
from diffcraft.errors import DataError
from diffcraft.storage import Location


class ClipDataset(Dataset):
    """4 s clips of one split: item = {audio [64000], f0_hz, voicing, loudness_db [400]}.
    `cache` is a folder or a URI; a remote cache is staged onto this node's disk first."""

    def __init__(self, cache: str | Path, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {SPLITS}")
        self.cache = local_cache(str(cache))
        manifest = require_manifest(Location.of(str(self.cache)))
        self.dirs = sorted(e["dir"] for e in manifest["files"].values() if e["split"] == split)
        self.songs = {e["dir"]: e["song"] for e in manifest["files"].values()}
        counts = {e["dir"]: e["n_clips"] for e in manifest["files"].values()}
        self.index = [(d, i) for d in self.dirs for i in range(counts[d])]
        if not self.index:
            raise DataError(f"{cache}: the {split} split has no clips "
                            f"(songs: {len({e['song'] for e in manifest['files'].values()})})")
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def clip_names(self) -> list[str]:
        """`song/file#index` of every clip, in order: the same clip has the same name in every run."""
        return [f"{self.songs[name]}/{name}#{i}" for name, i in self.index]

    def _open(self, name: str) -> dict[str, np.ndarray]:
        if name not in self._arrays:  # opened lazily, so the dataset pickles into workers
            folder = self.cache / "files" / name
            self._arrays[name] = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ARRAYS}
        return self._arrays[name]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        name, clip = self.index[i]
        arrays = self._open(name)
        return {k: torch.from_numpy(np.array(arrays[k][clip])) for k in ARRAYS}

    def window(self, i: int, offset: int) -> dict[str, torch.Tensor]:
        """Clip i moved `offset` frames later in its file (0 <= offset < CLIP_FRAMES), into the next
        clip: a clip's shapes, a stretch of the same recording. A file's last clip stays as it is."""
        name, clip = self.index[i]
        arrays = self._open(name)
        start = min(clip * CLIP_FRAMES + offset, (arrays["audio"].shape[0] - 1) * CLIP_FRAMES)
        first, shift = divmod(start, CLIP_FRAMES)
        out = {}
        for key in ARRAYS:
            per_frame = HOP_LENGTH if key == "audio" else 1
            both = np.asarray(arrays[key][first: first + 2]).reshape(-1)
            out[key] = torch.from_numpy(np.array(both[shift * per_frame: (shift + CLIP_FRAMES) * per_frame]))
        return out

    def __getstate__(self):
        return {**self.__dict__, "_arrays": {}}


def split_sizes(cache: str | Path) -> dict[str, int]:
    """Clips per split, from the manifest alone (nothing staged)."""
    sizes: dict[str, int] = {}
    for entry in require_manifest(Location.of(str(cache)))["files"].values():
        sizes[entry["split"]] = sizes.get(entry["split"], 0) + entry["n_clips"]
    return sizes
