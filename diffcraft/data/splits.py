"""Which song each clip's split is: train, validation (picks the best epoch) or test (the numbers
a report cites). Always by song, so no piece is heard in two splits: the stems of one song are
often parts of one performance, and a split by file would leak it.

A split comes from a split file (a YAML or JSON mapping `train:`, `validation:`, `test:` to lists
of song names, e.g. a paper's published split) or from fractions of the songs, ranked by a hash of
(seed, song): the same songs and seed always give the same split, and a new song moves at most one other
across each boundary.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from diffcraft.errors import ConfigError, DataError

SPLITS = ("train", "validation", "test")
FEW_CLIPS = 8  # a split with fewer clips than this gets a warning: its standard errors are wide


def split_by_fractions(songs: list[str], validation: float, test: float, seed: int = 0) -> dict[str, str]:
    """song -> split. Each held-out split gets round(fraction x songs) songs, at least one when its
    fraction is positive and enough songs remain, and training always keeps one song."""
    ranked = sorted(set(songs), key=lambda s: hashlib.sha256(f"{seed}\x00{s}".encode()).hexdigest())
    n = len(ranked)

    def share(fraction: float, available: int) -> int:
        return 0 if fraction <= 0 or available < 2 else min(available - 1, max(1, round(fraction * n)))

    n_val = share(validation, n)
    n_test = share(test, n - n_val)
    return {song: "validation" if i < n_val else "test" if i < n_val + n_test else "train"
            for i, song in enumerate(ranked)}


def read_split_file(path: str | Path) -> dict[str, str]:
    """song -> split from a YAML/JSON file of `split: [songs]`; a song named twice is refused."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"split_file: {path}: no such file") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"split_file: {path}: not valid YAML/JSON ({err})") from None
    if not isinstance(data, dict) or not set(data) <= set(SPLITS):
        raise ConfigError(f"split_file: {path}: expected a mapping of {', '.join(SPLITS)} to lists of songs, "
                          f"got keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    out: dict[str, str] = {}
    for split, songs in data.items():
        for song in songs or []:
            if str(song) in out:
                raise ConfigError(f"split_file: {path}: song {song!r} is in both {out[str(song)]} and {split}")
            out[str(song)] = split
    return out


def assign_splits(songs: list[str], validation: float, test: float, seed: int = 0,
                  split_file: str = "") -> dict[str, str]:
    """song -> split for the songs a cache holds, from the split file when there is one (every
    song must be in it) or else by fractions."""
    if not split_file:
        return split_by_fractions(songs, validation, test, seed)
    named = read_split_file(split_file)
    missing = sorted(set(songs) - set(named))
    if missing:
        raise DataError(f"split_file: {split_file}: these songs of the source are in no split: "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    return {song: named[song] for song in songs}


def split_warnings(song_splits: dict[str, str], clips_per_song: dict[str, int]) -> list[str]:
    """What a person should know before citing numbers from these splits."""
    out = []
    for split in SPLITS:
        songs = [s for s, where in song_splits.items() if where == split]
        clips = sum(clips_per_song.get(s, 0) for s in songs)
        if not songs:
            why = {"train": "nothing can train", "validation": "training needs validation clips to pick the best "
                   "epoch", "test": "reports will cite validation numbers, which are optimistic (the best epoch "
                   "was chosen on them)"}[split]
            out.append(f"the {split} split is empty: {why}")
        elif split != "train" and len(songs) == 1:
            out.append(f"the {split} split holds one song ({songs[0]}): its numbers describe that song, "
                       "not the instrument")
        elif split != "train" and clips < FEW_CLIPS:
            out.append(f"the {split} split holds {clips} clips: its standard errors will be wide")
    return out
