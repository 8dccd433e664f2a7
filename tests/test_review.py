"""Reviewing a study: MLflow opens on the runs, runs are named by what they test, and study-file
mistakes are refused before Ray, MLflow or the study's folder exist."""
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from mlflow.tracking import MlflowClient

from diffcraft.cli import main
from diffcraft.errors import StudyConfigError
from diffcraft.study.space import trial_label
from diffcraft.study.studyfile import file_schema, load_study
from tests.test_study import write_study

STUDIES = Path(__file__).parent.parent / "studies"
ENCODER = {"encoding": "separate", "core": "gru", "width": 16, "latent_size": 2, "head_width": 8}


@pytest.mark.parametrize("stage,latent", [("decoder", "deterministic"), ("encoder", "deterministic"),
                                          ("encoder", "vae"), ("joint", "deterministic")])
def test_declared_epoch_metrics_are_what_each_stage_reports(synth_cache, tmp_path, stage, latent):
    from diffcraft.train.loop import train
    from diffcraft.train.stages import epoch_metric_names
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(synth_cache, tmp_path, epochs=1)
    cfg.model.stage = stage
    cfg.model.encoder.__dict__.update(ENCODER, latent=latent)
    reported = train(cfg, progress=False).history[-1]
    assert set(reported) == epoch_metric_names(cfg)


def test_trial_names_say_what_varies_in_short():
    assert trial_label({"model.decoder.core": "bimamba", "train.lr": 3.1623e-4, "train.seed": 1}) == \
        "core=bimamba lr=3.16e-4 seed=1"
    assert trial_label({"model.decoder.core": "gru", "model.encoder.core": "mamba"}) == \
        "decoder.core=gru encoder.core=mamba"
    assert trial_label({}) == "base"


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test."""
    import diffcraft.raytools

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(diffcraft.raytools, "ray_session", refuse)


def refused_by_study_run(tmp_path, path, capsys) -> str:
    """`diffcraft study run` on `path`: refused within seconds, nothing left behind; its message."""
    started = time.time()
    assert main(["study", "run", str(path)]) == 2
    assert time.time() - started < 5
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "studies").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("fields,message", [
    ({"objective": {"metric": "val_accuracy"}},
     "objective.metric: 'val_accuracy' is not a metric that this study's trials (model.stage: decoder) report; "
     "they report: audio_seconds_per_second"),
    ({"objective": {"metric": "val_rpa", "mode": "max"}}, "objective.metric: 'val_rpa' is not a metric"),
    ({"search": {"space": {"model.encoder.latent": {"grid": ["deterministic", "vae"]}},
                 "algorithm": "grid"}, "run": {"model": {"stage": "joint"}}, "objective": {"metric": "val_kl"}},
     "objective.metric: 'val_kl' is not a metric that the trials with model.encoder.latent=deterministic report"),
    ({"collapse_guard": {"min_active_units": 4}}, "collapse_guard.min_active_units: 4 watches val_active_units"),
    ({"search": {"space": {"loss.kl.beta": {"loguniform": [1e-5, 1.0]}}, "algorithm": "random"}},
     "search.space.loss.kl.beta: no trial reads it (only VAE latents"),
    ({"search": {"space": {"model.encoder.core": {"grid": ["gru", "mamba"]}}}},
     "search.space.model.encoder.core: no trial reads it (the decoder stage has no encoder)"),
    ({"run": {"model": {"decoder": {"reverb_seconds": 6.0}}}},
     "run.model.decoder.reverb_seconds: 6 s is longer than a training clip (4 s)"),
    ({"search": {"space": {"data.batch_size": {"choice": [2, 3]}}, "algorithm": "random"},
      "resources": {"workers": 2, "cpus_per_worker": 0.5}},
     "search.space.data.batch_size: 3 (the global batch) does not split evenly over resources.workers: 2"),
])
def test_study_mistakes_are_refused_before_anything_starts(tmp_path, capsys, no_ray, fields, message):
    path = write_study(tmp_path, tmp_path / "cache", **fields)
    err = refused_by_study_run(tmp_path, path, capsys)
    assert message in err and "study.yaml" in err


def test_a_study_name_used_by_a_different_file_is_refused_saying_what_differs(tmp_path, capsys, no_ray):
    from diffcraft.study.record import StudyRecord

    path = write_study(tmp_path, tmp_path / "cache")
    first = load_study(path)
    StudyRecord("s", "", "", "", first.plain()).save(first.location)  # the study as it was started
    changed = load_study(path, ["run.train.epochs=5", "run.train.lr=0.01"])
    assert main(["study", "run", str(path), "--set", "run.train.epochs=5", "run.train.lr=0.01"]) == 2
    err = capsys.readouterr().err
    assert "(run.train.epochs, run.train.lr differ): run.train.epochs was 2, now 5; run.train.lr was 0.001, now 0.01" \
        in err and f"diffcraft study resume s --storage {changed.storage}" in err
    assert sorted(p.name for p in (tmp_path / "studies" / "s").iterdir()) == ["study.json"]  # no lease left
    assert not (tmp_path / "mlflow.db").exists()


def test_promote_refuses_metrics_the_trials_do_not_report(tmp_path):
    from diffcraft.study.promote import promote

    study = load_study(write_study(tmp_path, tmp_path / "cache"))  # never started: refused before reading it
    with pytest.raises(StudyConfigError, match=r"--where 'active_units >= 4': 'active_units' is not a metric .*"
                                               r"they report: .*val_mss_mean"):
        promote(study, where=["mss_mean <= 10", "active_units >= 4"])
    with pytest.raises(StudyConfigError, match=r"--metric: 'val_acc'"):
        promote(study, metric="val_acc")
    with pytest.raises(StudyConfigError, match="has not been started"):  # known names pass the check
        promote(study, where=["mss_mean <= 10", "val_loss < 3"])


@pytest.mark.parametrize("name", sorted(p.stem for p in STUDIES.glob("*.yaml")))
def test_shipped_studies_and_their_runs_match_the_exported_schemas(name):
    data = yaml.safe_load((STUDIES / f"{name}.yaml").read_text())
    jsonschema.validate(data, file_schema("study"))
    jsonschema.validate(data["run"], file_schema("run"))


@pytest.mark.parametrize("edit,where", [
    (lambda d: d["search"].update(algoritm="grid"), "'algoritm' was unexpected"),
    (lambda d: d["run"]["train"].update(lr="fast"), "'fast' is not of type 'number'"),
    (lambda d: d["search"]["space"].update({"train.lr": {"normal": [0, 1]}}), "'normal' was unexpected"),
    (lambda d: d["objective"].update(mode="lowest"), "'lowest' is not one of ['min', 'max']"),
])
def test_the_schema_refuses_what_load_study_refuses(edit, where):
    data = yaml.safe_load((STUDIES / "quickstart.yaml").read_text())
    edit(data)
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(data, file_schema("study"))
    assert where in str(info.value)


def test_study_schema_command_writes_a_schema_with_descriptions(tmp_path):
    import json

    assert main(["study", "schema", "--out", str(tmp_path / "study.schema.json")]) == 0
    schema = json.loads((tmp_path / "study.schema.json").read_text())
    assert schema["properties"]["concurrency"] == {"type": "integer", "description": "trials at once", "default": 1}
    assert schema["properties"]["run"]["properties"]["train"]["properties"]["precision"]["enum"] == ["fp32", "bf16"]
    assert schema["required"] == ["name"] and schema["additionalProperties"] is False


def test_a_finished_study_reads_as_a_study_in_mlflow(ray_local, synth_cache, tmp_path):
    """Experiment tagged for the model-training view, trial runs named by what varies, searched
    fields and the objective as columns, the parent run describing the result, and `status`
    showing a failed trial's error and where the rest of it is."""
    from diffcraft.study.runner import run_study
    from diffcraft.study.status import status_lines

    path = write_study(tmp_path, synth_cache, run={"train": {"epochs": 1}}, objective={"metric": "val_mss_mean"},
                       search={"algorithm": "grid", "space": {"model.decoder.core": {"grid": ["gru"]},
                                                              "train.lr": {"grid": [1e-3, 1e12]}}})
    study = load_study(path)
    run_study(study, verbose=0)
    client = MlflowClient(study.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("s")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.trial_id != ''")}
    assert set(runs) == {"core=gru lr=0.001", "core=gru lr=1e12"}
    good, bad = runs["core=gru lr=0.001"], runs["core=gru lr=1e12"]
    assert good.data.tags["trial_name"].startswith("trial_main_") and good.data.tags["trial_id"]
    assert good.data.params["model.decoder.core"] == "gru" and good.data.params["train.lr"] == "0.001"
    assert "val_mss_mean" in good.data.metrics and "best_val_mss_mean" in good.data.tags
    parent = client.search_runs([exp.experiment_id], "tags.role = 'study'")[0]
    note = parent.data.tags["mlflow.note.content"]
    assert "**Best trial: `core=gru lr=0.001`**" in note and "| configuration | seeds | parameters | s/epoch | test_mss_mean |" in note
    lines = status_lines(study)
    failed = lines.index(next(line for line in lines if "core=gru lr=1e12" in line))
    assert "FAILED" in lines[failed] and lines[failed + 1].strip().startswith("error: FloatingPointError: epoch 0")
    full = lines[failed + 2].split("full error: ", 1)[1]
    assert "Traceback" in Path(full).read_text() and bad.info.status == "FAILED"
