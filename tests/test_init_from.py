"""`train.init_from`: a run starts from one checkpoint or several, each top-level module (encoder,
decoder) from at most one of them, and reports what it loaded from where; a checkpoint that gives
nothing, gives a module twice or holds a tensor of another shape is refused with its file named."""
import re

import pytest
import torch
import yaml

from diffcraft.errors import CheckpointError
from diffcraft.models.autoencoder import DiffCraft
from diffcraft.train.checkpoint import init_weights, load_checkpoint, save_checkpoint
from diffcraft.train.config import load_run_config
from diffcraft.train.loop import start, train
from diffcraft.train.session import Session
from tests.conftest import tiny_run_config

ENCODER = {"encoding": "separate", "core": "gru", "width": 16, "latent_size": 2, "head_width": 8}


def stage_config(cache, out_dir, stage: str, **train_fields):
    cfg = tiny_run_config(cache, out_dir, epochs=1, **train_fields)
    cfg.name, cfg.model.stage = stage, stage
    cfg.model.encoder.__dict__.update(ENCODER)
    return cfg


@pytest.fixture(scope="module")
def stages(synth_cache, tmp_path_factory):
    """One-epoch encoder-stage and decoder-stage runs: {stage: their last.pt}."""
    out = tmp_path_factory.mktemp("stages")
    paths = {}
    for stage in ("encoder", "decoder"):
        paths[stage] = train(stage_config(synth_cache, out, stage), progress=False).run_dir / "checkpoints" / "last.pt"
    return paths


def tensors_of(model: torch.nn.Module, module: str) -> dict[str, torch.Tensor]:
    return {name: value for name, value in model.state_dict().items() if name.startswith(module + ".")}


def joint_model(cache, tmp_path, init_from) -> tuple[DiffCraft, dict]:
    """A joint run started (not trained) from `init_from`: its model and the init report."""
    run = start(stage_config(cache, tmp_path, "joint", init_from=init_from), Session(torch.device("cpu")))
    return run.model, run.result.init_report


def test_a_joint_run_starts_from_an_encoder_and_a_decoder_checkpoint(synth_cache, stages, tmp_path):
    model, report = joint_model(synth_cache, tmp_path, [str(stages["encoder"]), str(stages["decoder"])])
    for stage, path in stages.items():
        own, source = tensors_of(model, stage), load_checkpoint(path)["model"]
        assert report[stage] == {"from": str(path), "loaded": len(own), "of": len(own)} and own
        for name, weight in own.items():
            assert torch.equal(weight, source[name]), name
    assert set(report) == {"encoder", "decoder"}


def test_the_report_is_printed_kept_on_the_result_and_survives_a_resume(synth_cache, stages, tmp_path, capsys):
    cfg = stage_config(synth_cache, tmp_path, "joint", init_from=[str(stages["encoder"]), str(stages["decoder"])])
    first = train(cfg, progress=True)
    printed = capsys.readouterr().out
    assert "initial weights:" in printed
    n_encoder = first.init_report["encoder"]["of"]
    assert f"encoder  {n_encoder}/{n_encoder} tensors from {stages['encoder']}" in printed
    cfg.train.epochs = 2
    resumed = train(cfg, progress=False)
    assert resumed.init_report == first.init_report and len(resumed.history) == 2


def test_a_single_checkpoint_as_a_plain_string_still_works(synth_cache, stages, tmp_path):
    config = tmp_path / "joint.yaml"
    config.write_text(yaml.safe_dump({"train": {"init_from": str(stages["encoder"])}}))
    assert load_run_config(config).train.init_from == str(stages["encoder"])
    assert load_run_config(overrides=["train.init_from=[a.pt, b.pt]"]).train.init_from == ["a.pt", "b.pt"]
    model, report = joint_model(synth_cache, tmp_path, str(stages["encoder"]))
    assert report["encoder"]["from"] == str(stages["encoder"])
    assert report["encoder"]["loaded"] == report["encoder"]["of"] == len(tensors_of(model, "encoder"))
    assert report["decoder"] == {"from": None, "loaded": 0, "of": len(tensors_of(model, "decoder"))}


def test_a_checkpoint_that_gives_nothing_is_refused(synth_cache, stages, tmp_path):
    encoder_only = DiffCraft(stage_config(synth_cache, tmp_path, "encoder").model)
    decoder = re.escape(str(stages["decoder"]))
    with pytest.raises(CheckpointError, match=rf"{decoder}: no weight in it matches this model"):
        init_weights(encoder_only, [str(stages["encoder"]), str(stages["decoder"])])


def test_two_checkpoints_giving_the_same_module_are_refused(synth_cache, stages, tmp_path):
    joint = stage_config(synth_cache, tmp_path, "joint")
    whole = save_checkpoint(tmp_path / "joint.pt", {"model": DiffCraft(joint.model).state_dict()})
    decoder = re.escape(str(stages["decoder"]))
    with pytest.raises(CheckpointError, match=rf"{decoder}: it holds decoder weights, which {re.escape(str(whole))}"):
        init_weights(DiffCraft(joint.model), [str(whole), str(stages["decoder"])])


def test_a_tensor_of_another_shape_is_refused_and_named(synth_cache, stages, tmp_path):
    wider = stage_config(synth_cache, tmp_path, "joint")
    wider.model.encoder.head_width = 12
    encoder = re.escape(str(stages["encoder"]))
    with pytest.raises(CheckpointError, match=rf"{encoder}: weights of another shape than this model's: "
                                              r"encoder\.\S+ is \[8, 2\] there, \[12, 2\] here \(and \d+ more\)"):
        init_weights(DiffCraft(wider.model), [str(stages["encoder"])])
