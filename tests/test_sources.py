import numpy as np
import pytest
import soundfile as sf
import yaml

from diffcraft.data.sources import annotation_on_frames, discover, mdb_stem_synth, read_mdb_annotation
from diffcraft.errors import DataError


def _mdb_fixture(root, tracks):
    """Write tracks in the exact MDB-stem-synth format: 44.1 kHz PCM_16 wav + header-less csv
    with one `time,f0` row per 128 samples, f0 = 0 when unvoiced."""
    (root / "audio_stems").mkdir(parents=True)
    (root / "annotation_stems").mkdir()
    (root / "metadata").mkdir()
    rate = 44100
    for track, (f0_hz, instrument) in tracks.items():
        n = rate * 5
        t = np.arange(n) / rate
        voiced = (t > 1.0) & (t < 4.0)
        audio = np.where(voiced, 0.3 * np.sin(2 * np.pi * f0_hz * t), 0.0)
        sf.write(str(root / "audio_stems" / f"{track}.RESYN.wav"), audio, rate, subtype="PCM_16")
        rows = np.arange(0, n, 128)
        table = np.stack([rows / rate, np.where(voiced[rows], f0_hz, 0.0)], axis=1)
        np.savetxt(root / "annotation_stems" / f"{track}.RESYN.csv", table, fmt="%.6f", delimiter=",")
        song, stem = track.rsplit("_STEM_", 1)
        meta_path = root / "metadata" / f"{song}_METADATA.yaml"
        meta = yaml.safe_load(meta_path.read_text()) if meta_path.exists() else {"stems": {}}
        meta["stems"][f"S{stem}"] = {"instrument": instrument}
        meta_path.write_text(yaml.safe_dump(meta))
    return root


@pytest.fixture
def mdb(tmp_path):
    return _mdb_fixture(tmp_path / "MDB-stem-synth", {
        "MusicDelta_Pachelbel_STEM_01": (440.0, "violin"),
        "MusicDelta_Pachelbel_STEM_04": (330.0, "violin"),
        "AClassicEducation_NightOwl_STEM_08": (200.0, "male singer"),
    })


def test_mdb_layout_is_read_with_songs_and_annotations(mdb):
    files = discover(mdb)
    assert [f.path.name for f in files] == ["AClassicEducation_NightOwl_STEM_08.RESYN.wav",
                                            "MusicDelta_Pachelbel_STEM_01.RESYN.wav",
                                            "MusicDelta_Pachelbel_STEM_04.RESYN.wav"]
    assert {f.song for f in files} == {"AClassicEducation_NightOwl", "MusicDelta_Pachelbel"}
    assert all(f.annotation.is_file() for f in files)


def test_mdb_selects_by_instrument_metadata_and_by_stem_name(mdb):
    violins = mdb_stem_synth(mdb, instruments=["Violin"])
    assert {f.path.name.split(".")[0] for f in violins} == {"MusicDelta_Pachelbel_STEM_01",
                                                           "MusicDelta_Pachelbel_STEM_04"}
    one = mdb_stem_synth(mdb, stems=["MusicDelta_Pachelbel_STEM_04"])
    assert len(one) == 1 and one[0].song == "MusicDelta_Pachelbel"
    with pytest.raises(DataError, match="no stems matched"):
        mdb_stem_synth(mdb, instruments=["tuba"])


def test_mdb_annotation_resampled_onto_10ms_frames(mdb):
    time_s, f0 = read_mdb_annotation(mdb / "annotation_stems" / "MusicDelta_Pachelbel_STEM_04.RESYN.csv")
    assert np.allclose(np.diff(time_s)[:100], 128 / 44100, atol=2e-6)
    frame_f0, voicing = annotation_on_frames(time_s, f0, 500)
    assert frame_f0.shape == (500,)
    assert np.all(frame_f0[105:395] == pytest.approx(330.0, rel=1e-4))
    assert np.all(frame_f0[:95] == 0) and np.all(voicing[:95] == 0)
    assert np.all(voicing[105:395] == 1)


def test_missing_source_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "nope")
