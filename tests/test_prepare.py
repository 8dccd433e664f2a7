import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from diffcraft.data.dataset import ClipDataset
from diffcraft.data.prepare import PrepareConfig, keep_mask, prepare
from diffcraft.errors import DataError
from tests.conftest import sine


def test_keep_mask_cuts_only_silences_of_100ms_or_more():
    loud = np.full(100, -20.0)
    loud[10:15] = -90  # 50 ms: kept
    loud[40:60] = -90  # 200 ms: cut
    keep = keep_mask(loud, -60.0, 10)
    assert keep[10:15].all() and not keep[40:60].any() and keep.sum() == 80


def test_prepare_mdb_then_second_run_does_no_work(ray_local, synth_source, tmp_path):
    cache = tmp_path / "cache"
    first = prepare(synth_source, cache, progress=False)
    assert len(first.computed) == 4 and not first.skipped
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["params"]["min_silence_ms"] == 100.0
    assert {e["split"] for e in manifest["files"].values()} == {"train", "validation", "test"}
    before = {p: p.stat().st_mtime_ns for p in (cache / "files").rglob("*.npy")}
    second = prepare(synth_source, cache, progress=False)
    assert second.computed == [] and len(second.reused) == 4
    assert before == {p: p.stat().st_mtime_ns for p in (cache / "files").rglob("*.npy")}

    train = ClipDataset(cache, "train")
    item = train[0]
    assert item["audio"].shape == (64000,) and item["f0_hz"].shape == (400,)
    assert item["loudness_db"].shape == (400,) and item["voicing"].shape == (400,)
    voiced = item["voicing"] > 0.5
    assert (item["f0_hz"][voiced] > 100).all()


def test_prepare_recomputes_only_a_changed_file(ray_local, synth_source, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    cache = tmp_path / "cache"
    prepare(source, cache, progress=False)
    changed = sorted((source / "audio_stems").glob("*.wav"))[0]
    audio, rate = sf.read(str(changed))
    sf.write(str(changed), audio * 0.5, rate, subtype="PCM_16")
    again = prepare(source, cache, progress=False)
    assert again.computed == [changed.relative_to(source).as_posix()] and len(again.reused) == 3
    assert len(list((cache / "files").iterdir())) == 4  # the old version's folder is gone


def test_prepare_folder_with_crepe_skips_and_lists_bad_files(ray_local, tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    good = np.concatenate([sine(392, 3.0), np.zeros(16000, np.float32), sine(440, 3.0)])
    sf.write(str(folder / "good.wav"), good, 16000)
    sf.write(str(folder / "short.flac"), sine(440, 2.0), 16000)
    sf.write(str(folder / "silent.wav"), np.zeros(80000, np.float32), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF????WAVEfmt garbage")
    (folder / "stale.wav").write_bytes(b"")
    cache = tmp_path / "cache"
    summary = prepare(folder, cache, PrepareConfig(crepe_model="tiny", validation_fraction=0.0),
                      progress=False)
    assert summary.computed == ["good.wav"]
    assert set(summary.skipped) == {"short.flac", "silent.wav", "broken.wav", "stale.wav"}
    assert "shorter than one 4 s clip" in summary.skipped["short.flac"]
    assert "all silent" in summary.skipped["silent.wav"]
    assert any("skipped broken.wav" in line for line in summary.lines())
    clips = ClipDataset(cache, "train")
    assert len(clips) == 1  # 7 s of sound once the 1 s silence is cut: one 4 s clip
    f0 = clips[0]["f0_hz"].numpy()
    assert abs(np.median(f0[20:280]) - 392) < 5 and abs(np.median(f0[320:390]) - 440) < 5
    again = prepare(folder, cache, PrepareConfig(crepe_model="tiny", validation_fraction=0.0),
                    progress=False)
    assert again.computed == [] and set(again.skipped) == set(summary.skipped)
    assert not list((cache / "files").glob(".tmp-*"))


def test_prepare_of_only_bad_files_fails_naming_them(ray_local, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"")
    with pytest.raises(DataError, match="a.wav: is an empty file"):
        prepare(folder, tmp_path / "cache", PrepareConfig(crepe_model="tiny"), progress=False)


def test_prepare_cleans_leftovers_of_an_interrupted_run(ray_local, synth_source, tmp_path):
    cache = tmp_path / "cache"
    prepare(synth_source, cache, progress=False)
    victim = sorted((cache / "files").iterdir())[0]
    shutil.rmtree(victim)  # as if killed before this file's folder was renamed into place
    (cache / "files" / ".tmp-half-written").mkdir()
    again = prepare(synth_source, cache, progress=False)
    assert len(again.computed) == 1 and len(again.reused) == 3
    assert not (cache / "files" / ".tmp-half-written").exists()


def test_prepare_reads_a_source_in_an_object_store_and_writes_the_cache_there(ray_local, synth_source, tmp_path,
                                                                              monkeypatch):
    """Both ends in a real S3 API server: the tasks read their files from the store, the cache is
    written there, and a dataset stages a verified copy onto this node's disk."""
    import boto3

    from diffcraft.data.cache import read_manifest
    from diffcraft.storage import Location
    from tests.kit import S3Server

    with S3Server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DIFFCRAFT_SCRATCH", str(tmp_path / "scratch"))
        s3.create_bucket("data")
        client = boto3.client("s3")
        for path in synth_source.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), "data", f"src/{path.relative_to(synth_source).as_posix()}")
        first = prepare("s3://data/src", "s3://data/cache", progress=False)
        assert len(first.computed) == 4 and not first.skipped
        again = prepare("s3://data/src", "s3://data/cache", progress=False)
        assert again.computed == [] and len(again.reused) == 4
        manifest = read_manifest(Location.of("s3://data/cache"))
        prepare(synth_source, tmp_path / "local-cache", progress=False)
        local = json.loads((tmp_path / "local-cache" / "manifest.json").read_text())
        for key in ("audio", "f0_hz"):  # the same arrays as a local prepare of the same files
            assert {e["arrays"][key]["sha256"] for e in manifest["files"].values()} == \
                {e["arrays"][key]["sha256"] for e in local["files"].values()}
        train = ClipDataset("s3://data/cache", "train")
        assert str(train.cache).startswith(str(tmp_path / "scratch")) and train[0]["audio"].shape == (64000,)
        # an array changed in the store (same size, other bytes): another node's staged copy is refused
        entry = next(iter(manifest["files"].values()))
        key = f"cache/files/{entry['dir']}/audio.npy"
        body = client.get_object(Bucket="data", Key=key)["Body"].read()
        client.put_object(Bucket="data", Key=key, Body=body[:-4] + bytes(b ^ 0xFF for b in body[-4:]))
        monkeypatch.setenv("DIFFCRAFT_SCRATCH", str(tmp_path / "another-node"))
        with pytest.raises(DataError, match=rf"{entry['dir']}/audio.npy: the copy does not match the manifest"):
            ClipDataset("s3://data/cache", "train")
        assert not list((tmp_path / "another-node").rglob("manifest.json"))  # no copy counts as staged
