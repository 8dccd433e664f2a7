import subprocess
import sys
from pathlib import Path


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "diffcraft.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_error_names_the_problem_without_traceback(tmp_path):
    out = run_cli("data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "cache"))
    assert out.returncode == 2
    assert "missing: no such folder" in out.stderr and "Traceback" not in out.stderr


def test_cli_synth_writes_mdb_layout(tmp_path):
    out = run_cli("data", "synth", "--out", str(tmp_path / "s"), "--songs", "1", "--stems", "2",
                  "--seconds", "2")
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "s" / "audio_stems").glob("*.RESYN.wav"))) == 2
    assert len(list((tmp_path / "s" / "annotation_stems").glob("*.RESYN.csv"))) == 2


def test_cli_train_applies_set_overrides(synth_cache, tmp_path):
    import yaml

    from diffcraft.train.checkpoint import load_checkpoint

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cli", "out_dir": str(tmp_path / "runs"),
        "data": {"cache": str(synth_cache), "batch_size": 2, "clips_per_epoch": 4},
        "model": {"decoder": {"core": "gru", "width": 32, "mlp_layers": 1, "n_harmonics": 16, "reverb_seconds": 0.1}},
        "train": {"epochs": 3}}))
    out = run_cli("train", str(config), "--set", "train.epochs=1", "model.decoder.width=8", "train.lr=2e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    state = load_checkpoint(tmp_path / "runs" / "cli" / "checkpoints" / "last.pt")
    assert [h["epoch"] for h in state["history"]] == [0]
    assert state["config"]["model"]["decoder"]["width"] == 8 and state["config"]["train"]["lr"] == 2e-3
    bad = run_cli("train", str(config), "--set", "train.lr=fast")
    assert bad.returncode == 2 and "train.lr: expected a number, got 'fast'" in bad.stderr


def test_cli_prepare_selects_stems_by_id_and_instrument_from_a_metadata_folder(ray_local, tmp_path):
    """--instruments violin (MedleyDB metadata read from --metadata, moved out of the tree) and
    --stems together: only the stems that are both named and violins are prepared."""
    import json
    import shutil

    from tests.test_sources import _mdb_fixture

    root = _mdb_fixture(tmp_path / "MDB-stem-synth", {
        "MusicDelta_Pachelbel_STEM_01": (440.0, "violin"),
        "MusicDelta_Pachelbel_STEM_04": (330.0, "violin"),
        "AClassicEducation_NightOwl_STEM_02": (262.0, "violin"),
        "AClassicEducation_NightOwl_STEM_08": (200.0, "male singer"),
    })
    shutil.move(str(root / "metadata"), str(tmp_path / "Metadata"))
    out = run_cli("data", "prepare", str(root), "--out", str(tmp_path / "cache"), "--instruments", "violin",
                  "--metadata", str(tmp_path / "Metadata"), "--stems", "MusicDelta_Pachelbel_STEM_04",
                  "AClassicEducation_NightOwl_STEM_02", "AClassicEducation_NightOwl_STEM_08",
                  "--silence-db", "-100")  # the fixture's 5 s stems hold 3 s of tone: keep their silence
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 files computed" in out.stdout, out.stdout
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    prepared = {Path(name).name.split(".")[0] for name in manifest["files"]}
    assert prepared == {"MusicDelta_Pachelbel_STEM_04", "AClassicEducation_NightOwl_STEM_02"}, manifest["files"].keys()
    missing = run_cli("data", "prepare", str(root), "--out", str(tmp_path / "cache2"), "--instruments", "violin")
    assert missing.returncode == 2 and "needs MedleyDB metadata" in missing.stderr


def test_cli_transfer_with_the_encoders_f0_applies_pitch_shift_and_loudness_offset(synth_cache, tmp_path):
    """`transfer --f0 encoder --pitch-shift 12 --loudness-offset -12` on a tiny joint model: the
    file it writes is the library's transfer with those settings (the noise differs, so compared
    spectrally), not the unshifted one."""
    import numpy as np
    import soundfile as sf
    import torch

    from diffcraft.audio.io import load_audio
    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.train.checkpoint import model_from_checkpoint
    from diffcraft.train.loop import train
    from diffcraft.transfer import timbre_transfer
    from tests.conftest import sine, tiny_run_config

    cfg = tiny_run_config(synth_cache, tmp_path / "runs", epochs=1)
    cfg.model.stage = "joint"
    cfg.model.encoder.__dict__.update(encoding="separate", core="gru", width=16, latent_size=4, head_width=16)
    checkpoint = train(cfg, progress=False).run_dir / "checkpoints" / "best.pt"
    tone = sine(330.0, 2.0, 0.4, 22050)
    sf.write(str(tmp_path / "in.wav"), tone, 22050)
    out = run_cli("transfer", str(tmp_path / "in.wav"), "--model", str(checkpoint), "--out", str(tmp_path / "out"),
                  "--f0", "encoder", "--pitch-shift", "12", "--loudness-offset", "-12")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "F0 from encoder" in out.stdout
    written, rate = sf.read(str(tmp_path / "out" / "in_transfer.wav"), dtype="float32")
    assert rate == 16000 and abs(len(written) - 2 * 16000) <= 2
    model, _ = model_from_checkpoint(checkpoint)
    audio = load_audio(tmp_path / "in.wav")
    shifted = timbre_transfer(model, audio, "encoder", pitch_shift=12, loudness_offset=-12)
    plain = timbre_transfer(model, audio, "encoder")
    assert np.allclose(shifted.f0_hz, 2 * plain.f0_hz, rtol=1e-4)
    assert np.allclose(shifted.loudness_db, plain.loudness_db - 12, atol=1e-4)
    mss = MultiScaleSpectralLoss()
    n = min(len(written), len(shifted.audio))

    def distance(reference):
        return mss(torch.from_numpy(written[:n])[None], torch.from_numpy(reference[:n].copy())[None]).item()

    assert distance(shifted.audio) < distance(plain.audio)
