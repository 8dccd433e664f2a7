"""Promotion to the MLflow registry and timbre transfer from it, on a real finished study."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from mlflow.tracking import MlflowClient

from diffcraft.audio.crepe import crepe_pitch
from diffcraft.pitch import hz_to_cents
from diffcraft.errors import CheckpointError
from diffcraft.errors import StudyConfigError
from diffcraft.model_uri import resolve_checkpoint
from diffcraft.study.promote import promote
from diffcraft.study.runner import run_study
from diffcraft.study.studyfile import load_study
from diffcraft.train.checkpoint import model_from_checkpoint
from diffcraft.transfer import timbre_transfer
from tests.conftest import sine

pytestmark = pytest.mark.slow  # the module's study: about 50 s to set up


@pytest.fixture(scope="module")
def finished_study(ray_local, synth_cache, tmp_path_factory):
    """Three finished trials of different quality and one failed trial."""
    tmp = tmp_path_factory.mktemp("promote")
    study = {"name": "p", "storage": str(tmp / "studies"), "concurrency": 2,
             "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
             "run": {"data": {"cache": str(synth_cache), "batch_size": 2, "clips_per_epoch": 6},
                     "model": {"decoder": {"core": "gru", "width": 24, "mlp_layers": 1, "n_harmonics": 24,
                                           "reverb_seconds": 0.05}},
                     "train": {"epochs": 2}},
             "search": {"algorithm": "grid", "space": {"train.lr": {"grid": [3e-3, 1e-6, 1e-3, 1e12]}}},
             "objective": {"metric": "val_mss_mean", "mode": "min"}}
    (tmp / "study.yaml").write_text(yaml.safe_dump(study))
    loaded = load_study(tmp / "study.yaml")
    run_study(loaded, verbose=0)
    return loaded


def finished_values(study):
    client = MlflowClient(study.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(study.name)
    runs = client.search_runs([exp.experiment_id], "tags.trial_id != ''")
    values = {}
    for run in runs:
        if run.info.status == "FINISHED":
            epoch = int(run.data.tags["best_epoch"])
            history = client.get_metric_history(run.info.run_id, "val_mss_mean")
            values[run.data.tags["trial_name"]] = [m.value for m in history if m.step == epoch][-1]
    return runs, values


def artifact_checkpoint(study, run_id) -> Path:
    client = MlflowClient(study.mlflow.tracking_uri)
    return Path(unquote(urlparse(client.get_run(run_id).info.artifact_uri).path)) / "checkpoint" / "best.pt"


def test_promote_picks_the_best_finished_trial_and_moves_the_alias(finished_study):
    runs, values = finished_values(finished_study)
    assert len(values) == 3 and len(runs) == 4
    name = "diffcraft-p-ordering"  # a registered model of this test alone: its versions start at 1 in any order
    first = promote(finished_study, name=name)
    assert first.trial == min(values, key=values.get) and first.version == "1"
    assert first.reproduced == pytest.approx(first.value, rel=1e-3)
    second_best = sorted(values.values())[1]
    second = promote(finished_study, where=[f"mss_mean >= {second_best - 1e-9}"], name=name)
    assert second.value == pytest.approx(second_best) and second.version == "2"
    client = MlflowClient(finished_study.mlflow.tracking_uri)
    assert str(client.get_model_version_by_alias(second.name, "champion").version) == "2"
    assert {str(v.version) for v in client.search_model_versions(f"name='{second.name}'")} == {"1", "2"}
    version = client.get_model_version(second.name, "2")
    assert version.tags["study"] == "p" and version.tags["metric"] == "val_mss_mean" and version.description
    with pytest.raises(StudyConfigError, match="no finished trial"):
        promote(finished_study, where=["mss_mean < 0"], name=name)


def test_promote_refuses_a_checkpoint_whose_metric_does_not_reproduce(finished_study, tmp_path):
    """The best trial's logged checkpoint replaced by a loadable one with other weights: the
    re-measured validation MSS differs from the logged one, so nothing is registered."""
    from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint

    runs, values = finished_values(finished_study)
    best = next(r for r in runs if r.data.tags.get("trial_name") == min(values, key=values.get))
    path = artifact_checkpoint(finished_study, best.info.run_id)
    backup = tmp_path / "best.pt"
    shutil.copy(path, backup)
    name = "diffcraft-p-unreproduced"
    try:
        state = load_checkpoint(path)
        torch.manual_seed(0)
        state["model"] = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in state["model"].items()}
        save_checkpoint(path, state)
        with pytest.raises(CheckpointError, match=r"not the logged .*refusing to promote it"):
            promote(finished_study, name=name)
    finally:
        shutil.copy(backup, path)
    client = MlflowClient(finished_study.mlflow.tracking_uri)
    assert not client.search_model_versions(f"name='{name}'")


def test_promote_refuses_an_unfinished_trial(finished_study):
    runs, _ = finished_values(finished_study)
    failed = next(r for r in runs if r.info.status == "FAILED")
    with pytest.raises(StudyConfigError, match="FAILED, not FINISHED"):
        promote(finished_study, trial=failed.data.tags["trial_id"])


@pytest.mark.parametrize("damage,message", [("truncate", "corrupt or truncated"), ("pickle", "could execute code")])
def test_promote_refuses_a_damaged_checkpoint(finished_study, damage, message, tmp_path):
    runs, values = finished_values(finished_study)
    best = next(r for r in runs if r.data.tags.get("trial_name") == min(values, key=values.get))
    path = artifact_checkpoint(finished_study, best.info.run_id)
    backup = tmp_path / "best.pt"
    shutil.copy(path, backup)
    try:
        if damage == "truncate":
            path.write_bytes(backup.read_bytes()[:500])
        else:
            class Exploit:
                def __reduce__(self):
                    return (os.system, ("echo pwned > /tmp/diffcraft-pwned",))
            torch.save({"format": "diffcraft-checkpoint", "model": Exploit()}, path)
        with pytest.raises(CheckpointError, match=message):
            promote(finished_study, name="damaged")
        assert not Path("/tmp/diffcraft-pwned").exists()
    finally:
        shutil.copy(backup, path)


def test_transfer_from_the_registry_follows_the_input_pitch_shifted(finished_study, tmp_path):
    promote(finished_study, alias="transfer")
    tone = sine(262.0, 3.0, 0.5, 22050) + sine(524.0, 3.0, 0.2, 22050)
    sf.write(str(tmp_path / "in.flac"), np.stack([tone, tone], 1), 22050)  # stereo, 22.05 kHz
    (tmp_path / "bad.wav").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "diffcraft.cli", "transfer", str(tmp_path / "in.flac"),
                          str(tmp_path / "bad.wav"), "--model", "models:/diffcraft-p@transfer",
                          "--tracking-uri", finished_study.mlflow.tracking_uri, "--out", str(tmp_path / "out"),
                          "--pitch-shift", "5", "--crepe-model", "tiny", "--plot"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "bad.wav: is an empty file" in out.stderr and "real-time factor" in out.stdout
    audio, rate = sf.read(str(tmp_path / "out" / "in_transfer.wav"))
    assert rate == 16000 and abs(len(audio) - 3 * 16000) <= 2
    assert (tmp_path / "out" / "in_transfer.png").stat().st_size > 5000
    f0, periodicity = crepe_pitch(audio.astype(np.float32), "tiny", progress=False)
    error = hz_to_cents(f0[20:280]) - hz_to_cents(262.0 * 2 ** (5 / 12))
    assert np.median(np.abs(error)) < 50


def test_long_input_is_processed_in_chunks_without_seams(finished_study, monkeypatch):
    import diffcraft.transfer as transfer

    model, _ = model_from_checkpoint(resolve_checkpoint(str(_any_checkpoint(finished_study))))
    phrase = np.concatenate([sine(f, 2.0, 0.4) for f in (220, 247, 262, 294, 330, 349, 392, 440)])  # 16 s
    monkeypatch.setattr(transfer, "crepe_pitch", lambda audio, *a, **k: (
        np.full(len(audio) // 160, 300.0, np.float32), np.ones(len(audio) // 160, np.float32)))
    torch.manual_seed(0)
    whole = timbre_transfer(model, phrase, f0_source="crepe").audio
    monkeypatch.setattr(transfer, "CHUNK_FRAMES", 250)  # 2.5 s chunks: 6 joins
    monkeypatch.setattr(transfer, "CONTEXT_FRAMES", 100)
    torch.manual_seed(0)
    chunked = timbre_transfer(model, phrase, f0_source="crepe").audio
    assert chunked.shape == whole.shape == phrase.shape
    assert np.abs(chunked - whole).max() < 1e-3 * max(1e-6, np.abs(whole).max()) + 1e-5
    steps = np.abs(np.diff(chunked))
    joins = [250 * 160 * k for k in range(1, 7)]
    assert max(steps[j - 1] for j in joins) <= 1.5 * np.percentile(steps, 99.9)


def _any_checkpoint(study):
    """A trial's checkpoint as Ray Train committed it in the study's storage."""
    trials = study.location.local_path() / "train"
    return next(p for p in sorted(trials.glob("*/checkpoint_*/state.pt")))
