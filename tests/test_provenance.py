"""Every run records how to reproduce it, and a study report says it once and warns when trials differ."""
import hashlib
import json
import subprocess

import torch

from diffcraft.study.report import reproducibility_section
from diffcraft.study.status import TrialRecord
from diffcraft.train.loop import train
from diffcraft.train.provenance import COMMAND_ENV, RECORD, code_state
from diffcraft.train.session import RUN_RECORD
from tests.conftest import tiny_run_config


def test_a_run_records_code_libraries_cache_and_command(synth_cache, tmp_path, monkeypatch):
    import diffcraft

    monkeypatch.setenv(COMMAND_ENV, "diffcraft train run.yaml --epochs 2")
    train(tiny_run_config(synth_cache, tmp_path, epochs=1), progress=False)
    record = json.loads((tmp_path / "tiny" / RUN_RECORD).read_text())
    package = diffcraft.__file__.rsplit("/", 1)[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True).stdout.strip()
    assert record[RECORD + "diffcraft.commit"] == head and record[RECORD + "diffcraft.dirty"] in ("true", "false")
    assert record[RECORD + "torch"] == torch.__version__ and record[RECORD + "gpu"] == "none"
    assert record[RECORD + "cache_manifest"] == hashlib.sha256((synth_cache / "manifest.json").read_bytes()).hexdigest()
    assert record[RECORD + "command"] == "diffcraft train run.yaml --epochs 2"
    assert {RECORD + k for k in ("ray", "mlflow", "optuna", "numpy", "cuda", "python")} <= set(record)
    assert record["scan"] == "none"


def test_code_state_is_the_checkouts_commit_and_dirt_or_the_version(tmp_path):
    import diffcraft

    assert set(code_state(tmp_path / "diffcraft")) == {"version"}  # not a checkout: a wheel's version
    package = tmp_path / "repo" / "diffcraft"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    git = ["git", "-C", str(package.parent), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "c"]):
        subprocess.run(git + args, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_state(package) == {"commit": head, "dirty": "false"}
    (package / "__init__.py").write_text("x = 2\n")
    assert code_state(package) == {"commit": head, "dirty": "true"}
    assert code_state(package)["commit"] != diffcraft.__version__


def test_the_report_states_the_record_once_and_names_trials_that_differ():
    def trial(name, torch_version):
        return TrialRecord(name, name, "FINISHED", {}, "", "0", 1, {}, {}, False, name,
                           record={RECORD + "torch": torch_version, RECORD + "numpy": "2.0"})

    same = "\n".join(reproducibility_section([trial("a", "2.5"), trial("b", "2.5")]))
    assert "| numpy | `2.0` |" in same and "| torch | `2.5` |" in same and "Warning" not in same
    differ = "\n".join(reproducibility_section([trial("a", "2.5"), trial("b", "2.5"), trial("c", "2.6")]))
    assert "differ in 1 of these" in differ and "**torch**: `2.5` (2 trials: a, b); `2.6` (1 trial: c)" in differ


def test_a_ray_worker_without_its_drivers_command_says_so(monkeypatch):
    from diffcraft.train.provenance import command

    monkeypatch.delenv(COMMAND_ENV, raising=False)
    monkeypatch.setattr("sys.argv", ["/x/ray/_private/workers/default_worker.py", "--node-ip-address=1"])
    assert command().startswith("unknown: a Ray worker")
    monkeypatch.setattr("sys.argv", ["train.py", "--epochs", "2 3"])
    assert command() == "train.py --epochs '2 3'"
    monkeypatch.setenv(COMMAND_ENV, "diffcraft study run s.yaml")
    assert command() == "diffcraft study run s.yaml"
