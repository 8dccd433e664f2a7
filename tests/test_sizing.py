"""Ablations at matched size: the decoder width that gives every core the base model's parameters."""
import pytest
import yaml

from diffcraft.models.autoencoder import DiffCraft
from diffcraft.models.sizing import count_parameters, matched_width, model_parameters
from diffcraft.errors import StudyConfigError
from diffcraft.study.studyfile import load_study
from diffcraft.typed_yaml import from_dict
from diffcraft.models.autoencoder import ModelConfig

TINY = {"stage": "decoder", "decoder": {"core": "gru", "width": 48, "mlp_layers": 1, "n_harmonics": 8,
                                        "n_noise_bands": 9}}


def tiny(core: str) -> ModelConfig:
    return from_dict(ModelConfig, {**TINY, "decoder": {**TINY["decoder"], "core": core}})


def test_counts_on_the_meta_device_equal_a_real_model():
    for core in ("gru", "bimamba"):
        assert model_parameters(tiny(core)) == count_parameters(DiffCraft(tiny(core)))


@pytest.mark.parametrize("core", ["mamba", "bigru", "bimamba"])
def test_matched_width_is_the_closest_to_the_budget(core):
    target = model_parameters(tiny("gru"))
    cfg = tiny(core)
    width = matched_width(cfg, target)
    sizes = {}
    for w in (width - 1, width, width + 1):
        cfg.decoder.width = w
        sizes[w] = model_parameters(cfg)
    assert abs(sizes[width] - target) == min(abs(v - target) for v in sizes.values())
    assert abs(sizes[width] - target) / target < 0.05
    if core.startswith("bi"):
        assert width < 48  # a bidirectional core needs a narrower decoder for the same budget


def test_a_study_matches_parameters_per_trial_and_refuses_a_searched_width(tmp_path):
    study = {"name": "s", "run": {"model": TINY}, "search": {"algorithm": "grid", "match_parameters": True,
                                                            "space": {"model.decoder.core": {"grid": ["gru", "bigru"]}}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    configs = {params["model.decoder.core"]: cfg for params, cfg in load_study(path).variants()}
    assert configs["gru"].model.decoder.width == 48 and configs["bigru"].model.decoder.width < 48
    study["search"]["space"]["model.decoder.width"] = {"grid": [32, 64]}
    path.write_text(yaml.safe_dump(study))
    with pytest.raises(StudyConfigError, match="search.match_parameters: sets model.decoder.width"):
        load_study(path)
