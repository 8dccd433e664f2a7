"""Splits by song: stable, disjoint, from fractions or a split file, with warnings a person needs."""
import json

import pytest

from diffcraft.data.dataset import ClipDataset
from diffcraft.data.prepare import PrepareConfig, prepare
from diffcraft.data.splits import assign_splits, split_by_fractions, split_warnings
from diffcraft.errors import ConfigError, DataError

SONGS = [f"song{i:02d}" for i in range(20)]


def by_split(mapping):
    out = {}
    for song, split in mapping.items():
        out.setdefault(split, set()).add(song)
    return out


def test_fraction_splits_are_stable_disjoint_and_sized():
    first = split_by_fractions(SONGS, 0.2, 0.1, seed=3)
    assert first == split_by_fractions(list(reversed(SONGS)), 0.2, 0.1, seed=3)  # order does not matter
    groups = by_split(first)
    assert {k: len(v) for k, v in groups.items()} == {"train": 14, "validation": 4, "test": 2}
    assert set(first) == set(SONGS)  # every song in exactly one split (a dict cannot hold two)
    other = split_by_fractions(SONGS, 0.2, 0.1, seed=4)
    assert other != first  # the seed picks the songs
    grown = split_by_fractions(SONGS + ["song99"], 0.2, 0.1, seed=3)
    moved = [s for s in SONGS if grown[s] != first[s]]
    assert len(moved) <= 2  # a new song moves at most one song across each of the two boundaries


@pytest.mark.parametrize("n, expected", [(1, {"train": 1}), (2, {"train": 1, "validation": 1}),
                                         (3, {"train": 1, "validation": 1, "test": 1})])
def test_few_songs_keep_one_for_training(n, expected):
    sizes = {k: len(v) for k, v in by_split(split_by_fractions(SONGS[:n], 0.2, 0.2)).items()}
    assert sizes == expected


def test_split_file_is_used_and_checked(tmp_path):
    good = tmp_path / "split.yaml"
    good.write_text("train: [a, b]\nvalidation: [c]\ntest: [d, unused]\n")
    assert assign_splits(["a", "b", "c", "d"], 0.2, 0.2, split_file=str(good)) == {
        "a": "train", "b": "train", "c": "validation", "d": "test"}
    with pytest.raises(DataError, match=r"split.yaml: these songs of the source are in no split: e"):
        assign_splits(["a", "e"], 0.2, 0.2, split_file=str(good))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"train": ["a"], "test": ["a"]}))
    with pytest.raises(ConfigError, match=r"twice.json: song 'a' is in both train and test"):
        assign_splits(["a"], 0, 0, split_file=str(twice))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("training: [a]\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: expected a mapping of train, validation, test"):
        assign_splits(["a"], 0, 0, split_file=str(wrong))


def test_warnings_name_empty_single_song_and_tiny_splits():
    warnings = split_warnings({"a": "train", "b": "validation"}, {"a": 50, "b": 3})
    assert any("the test split is empty: reports will cite validation numbers" in w for w in warnings)
    assert any("the validation split holds one song (b)" in w for w in warnings)
    tiny = split_warnings({"a": "train", "b": "test", "c": "test", "d": "validation", "e": "validation"},
                          {"a": 50, "b": 1, "c": 2, "d": 20, "e": 20})
    assert tiny == ["the test split holds 3 clips: its standard errors will be wide"]


def test_prepare_records_the_split_and_a_new_split_recomputes_nothing(ray_local, synth_source, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(synth_source, cache, PrepareConfig(), progress=False)
    manifest = json.loads((cache / "manifest.json").read_text())
    songs = {split: manifest["splits"][split] for split in ("train", "validation", "test")}
    assert sorted(sum(songs.values(), [])) == sorted({e["song"] for e in manifest["files"].values()})
    assert all(len(songs[s]) == 1 for s in ("validation", "test"))
    for split in ("train", "validation", "test"):
        clips = ClipDataset(cache, split)
        assert {e["song"] for e in manifest["files"].values() if e["dir"] in clips.dirs} == set(songs[split])
    assert sum(first.n_clips.values()) == sum(e["n_clips"] for e in manifest["files"].values())
    split_file = tmp_path / "split.yaml"
    split_file.write_text(f"train: {songs['train'] + songs['test']}\nvalidation: {songs['validation']}\n")
    again = prepare(synth_source, cache, PrepareConfig(split_file=str(split_file)), progress=False)
    assert again.computed == [] and len(again.reused) == len(first.computed)
    assert "test" not in again.n_clips
    assert any("the test split is empty" in line for line in again.lines())
    with pytest.raises(DataError, match="the test split has no clips"):
        ClipDataset(cache, "test")
