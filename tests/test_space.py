"""The search space as typed records: parsed once when the study file loads, written back as the
file wrote it, and applied to a trial's run config the way a run config file would be read."""
import pytest
import yaml

from diffcraft.errors import ConfigError
from diffcraft.study.space import Range, Values
from diffcraft.study.studyfile import load_study
from diffcraft.train.config import RunConfig
from diffcraft.typed_yaml import with_values

SPACE = {"model.decoder.core": {"grid": ["gru", "mamba"]}, "train.lr": {"loguniform": [1.0e-4, 1.0e-2]},
         "loss.kl.free_bits": {"choice": [0, 0.5]}, "train.epochs": {"int": [1, 3]},
         "train.grad_clip": {"uniform": [1, 3.5]}}


def study_with(tmp_path, space: dict, **run):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "storage": str(tmp_path / "studies"),
                                    "run": {"model": {"stage": "joint", "encoder": {"latent": "vae"}}, **run},
                                    "search": {"algorithm": "random", "space": space}}, sort_keys=False))
    return load_study(path)


def test_each_dimension_is_a_record_and_the_study_keeps_the_file_form(tmp_path):
    study = study_with(tmp_path, SPACE)
    space = study.search.space
    assert space["model.decoder.core"] == Values("grid", ("gru", "mamba"))
    assert space["loss.kl.free_bits"] == Values("choice", (0, 0.5))
    assert space["train.lr"] == Range("loguniform", 1.0e-4, 1.0e-2) and space["train.epochs"] == Range("int", 1, 3)
    assert study.plain()["search"]["space"] == SPACE  # what study.json keeps, and a job carries
    assert load_study(tmp_path / "s.yaml").plain() == study.plain()


def test_a_trial_config_is_typed_like_a_run_config_file(tmp_path):
    study = study_with(tmp_path, SPACE)
    cfg = study.trial_config({"loss.kl.free_bits": 0, "train.epochs": 3, "model.decoder.core": "mamba"})
    assert cfg.loss.kl.free_bits == 0.0 and isinstance(cfg.loss.kl.free_bits, float)
    assert cfg.train.epochs == 3 and cfg.model.decoder.core == "mamba"
    assert study.run.model.decoder.core == "gru"  # the base run is left as it was
    assert [params for params, _ in study.variants()][:2] == [
        {"model.decoder.core": "gru", "train.lr": 1e-4, "loss.kl.free_bits": 0, "train.epochs": 1, "train.grad_clip": 1},
        {"model.decoder.core": "gru", "train.lr": 1e-4, "loss.kl.free_bits": 0, "train.epochs": 1,
         "train.grad_clip": 3.5}]


@pytest.mark.parametrize("values,message", [
    ({"train.epochs": 1.5}, "train.epochs: expected an integer, got 1.5"),
    ({"train.epochs": 0}, "train.epochs: 0 must be at least 1"),
    ({"model.decoder.kore": "gru"}, "unknown field model.decoder.kore (known: core, core_layers,"),
    ({"train.lr.x": 1}, "train.lr.x: lr is not a section"),
    ({"model.decoder.core": "lstm"}, "model.decoder.core: 'lstm' is not one of"),
])
def test_a_searched_value_that_does_not_fit_names_the_field(values, message):
    with pytest.raises(ConfigError) as info:
        with_values(RunConfig(), values)
    assert message in str(info.value)


def test_the_tune_domains_sample_what_the_records_say():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert Values("grid", ("a", "b")).tune_domain() == {"grid_search": ["a", "b"]}
    assert isinstance(Values("choice", (1, 2)).tune_domain(), Categorical)
    integer = Range("int", 1, 3).tune_domain()
    assert isinstance(integer, Integer) and (integer.lower, integer.upper) == (1, 4)  # high included
    log = Range("loguniform", 1e-4, 1e-2).tune_domain()
    assert isinstance(log, Float) and type(log.sampler).__name__ == "_LogUniform"
    assert type(Range("uniform", 0.0, 1.0).tune_domain().sampler).__name__ == "_Uniform"
