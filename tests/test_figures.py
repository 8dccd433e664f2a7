import os
import subprocess
import sys

import pytest
import torch

from diffcraft.cli import main
from diffcraft.data.dataset import ClipDataset
from diffcraft.errors import DataError
from diffcraft.figures import latent_figures
from diffcraft.models.autoencoder import DiffCraft, ModelConfig
from diffcraft.train.checkpoint import model_from_checkpoint, save_checkpoint
from diffcraft.train.loop import train
from tests.conftest import tiny_run_config

PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["latent_interpolation.png", "latent_tsne.png"]


@pytest.fixture(scope="module")
def encoder_checkpoint(synth_cache, tmp_path_factory):
    """best.pt of a tiny encoder-stage VAE (separate encoding) trained for one epoch."""
    cfg = tiny_run_config(synth_cache, tmp_path_factory.mktemp("runs"), epochs=1)
    cfg.model.stage = "encoder"
    cfg.model.encoder.__dict__.update(encoding="separate", latent="vae", core="gru", width=16, latent_size=4,
                                      head_width=16)
    return train(cfg, progress=False).run_dir / "checkpoints" / "best.pt"


def assert_pngs(paths):
    assert sorted(p.name for p in paths) == FIGURES
    for path in paths:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_latent_figures_of_an_encoder_are_two_pngs_and_of_a_decoder_none(encoder_checkpoint, synth_cache, tmp_path):
    model, _ = model_from_checkpoint(encoder_checkpoint)
    clips = ClipDataset(synth_cache, "validation")
    assert_pngs(latent_figures(model, clips, tmp_path / "encoder"))
    assert not model.training
    decoder = DiffCraft(ModelConfig(stage="decoder"))
    assert latent_figures(decoder, clips, tmp_path / "decoder") == [] and not (tmp_path / "decoder").exists()


def test_dual_deterministic_and_collapsed_latents_still_draw_both_figures(synth_cache, tmp_path):
    """The dual encoding's shared latent feeds both maps; a latent constant over every frame (its
    head zeroed, as after posterior collapse) gets a panel saying so, where sklearn's t-SNE would
    crash the process."""
    clips = ClipDataset(synth_cache, "validation")
    cfg = ModelConfig(stage="encoder")
    cfg.encoder.__dict__.update(encoding="dual", latent="deterministic", core="gru", width=8, latent_size=4,
                                head_width=8)
    torch.manual_seed(0)
    model = DiffCraft(cfg).eval()
    assert_pngs(latent_figures(model, clips, tmp_path / "dual"))
    with torch.no_grad():
        for parameter in model.encoder.heads["shared"].parameters():
            parameter.zero_()
    assert_pngs(latent_figures(model, clips, tmp_path / "collapsed"))


def test_latent_figures_need_two_clips(encoder_checkpoint, synth_cache, tmp_path):
    model, _ = model_from_checkpoint(encoder_checkpoint)
    with pytest.raises(DataError, match="1 clip.*need at least 2"):
        latent_figures(model, [ClipDataset(synth_cache, "validation")[0]], tmp_path)


def test_cli_figures_of_a_checkpoint_writes_the_pngs(encoder_checkpoint, tmp_path):
    assert main(["figures", str(encoder_checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert_pngs(list((tmp_path / "out").iterdir()))


def test_cli_figures_errors_name_the_source(synth_cache, tmp_path, capsys):
    from dataclasses import asdict

    cfg = tiny_run_config(synth_cache, tmp_path)
    decoder = save_checkpoint(tmp_path / "decoder.pt", {"model": DiffCraft(cfg.model).state_dict(),
                                                         "config": asdict(cfg)})
    run_id = "0" * 32
    for source, message in ((str(tmp_path / "missing.pt"), "missing.pt: no such checkpoint"),
                            (str(decoder), "decoder.pt: a decoder-stage model has no encoder"),
                            (run_id, f"{run_id}: no such run at MLflow")):
        assert main(["figures", source, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
        assert message in capsys.readouterr().err


def test_cli_figures_of_a_run_id_logs_them_to_the_run(encoder_checkpoint, tmp_path):
    """A real MLflow run in a SQLite store with its checkpoint at checkpoint/best.pt, the store
    named by MLFLOW_TRACKING_URI (run as a subprocess: the CLI sets MLflow's global URI)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("figures", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(encoder_checkpoint), "checkpoint")
    client.set_terminated(run_id)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run([sys.executable, "-m", "diffcraft.cli", "figures", run_id], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_pngs(list((tmp_path / f"figures-{run_id}").iterdir()))
    logged = [a.path for a in client.list_artifacts(run_id, "figures")]
    assert sorted(logged) == [f"figures/{name}" for name in FIGURES]
