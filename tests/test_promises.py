"""README promises that only a real study shows, each study as small as it can be and shared by the
tests that read it: a `random` search with seeds, retries after a killed Ray Train worker, the
status / report / promote commands on it; the collapse guard (stop, and penalize in an Optuna
study); an Optuna study resumed after its driver was killed (the one killed-driver study: the
cluster test kills drivers on a cluster, test_study's SIGTERM test stops one gracefully)."""
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from diffcraft.study.runner import run_study
from diffcraft.study.studyfile import load_study
from tests.test_study import child_runs, write_study

pytestmark = pytest.mark.slow

VAE = {"encoding": "separate", "latent": "vae", "core": "gru", "width": 16, "latent_size": 4, "head_width": 16}
COLLAPSING_KL = {"schedule": "constant", "beta": 1000.0}  # a KL weight that closes the latents at once
ALL_UNITS_ACTIVE = 2 * VAE["latent_size"]  # the guard's floor: every dimension of both latents active


def cli(*args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "diffcraft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def descendants_named(root: int, word: str) -> list[int]:
    """Processes under `root` (by parent chain) whose command line contains `word`: this test's own
    Ray processes only, never another user's Ray on the same machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
            if word not in cmdline:
                continue
            parent = pid
            while parent > 1 and parent != root:
                parent = _ppid(parent)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
        if parent == root:
            found.append(pid)
    return sorted(found)


# --- a random search with seeds, one trial's worker killed once ----------------------------------

RANDOM_SPACE = {"train.lr": {"uniform": [5e-4, 2e-3]}, "model.decoder.width": {"int": [12, 20]},
                "model.decoder.core": {"choice": ["gru", "bigru"]}}


@pytest.fixture(scope="module")
def random_study(ray_local, synth_cache, tmp_path_factory):
    """`random` search, 2 samples x 2 seeds, `max_retries: 1`; once a first epoch is committed, one
    RayTrainWorker process of this test's Ray is SIGKILLed (a real fault: its trial fails and Tune
    retries it from its last committed epoch)."""
    tmp = tmp_path_factory.mktemp("random")
    path = write_study(tmp, synth_cache, max_retries=1, concurrency=2,
                       search={"algorithm": "random", "samples": 2, "seeds": 2, "space": RANDOM_SPACE})
    study = load_study(path)
    killed, stop = [], threading.Event()

    def kill_one_worker():
        while not stop.is_set() and not killed:
            time.sleep(0.2)
            try:
                client, _, children = child_runs(study)
                if not any(client.get_metric_history(r.info.run_id, "val_mss_mean") for r in children):
                    continue
            except Exception:  # noqa: BLE001 - the experiment is not created yet
                continue
            workers = descendants_named(os.getpid(), "RayTrainWorker")
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    started = time.time()
    try:
        outcome = run_study(study, verbose=0)
    finally:
        stop.set()
        killer.join(timeout=10)
    print(f"random study: {time.time() - started:.1f} s")
    return study, outcome, killed, tmp


def tune_failures(study) -> dict[str, int]:
    """Trial id -> failures, from Tune's experiment state in the study's storage."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(study.location.local_path() / "tune"))
    return {t.trial_id: t.run_metadata.num_failures for t in analysis.trials}


def test_a_trial_whose_worker_is_killed_is_retried_and_finishes_with_every_epoch_logged_once(random_study):
    study, outcome, killed, _ = random_study
    assert killed, "no RayTrainWorker of this test's Ray was found to kill"
    assert not outcome.interrupted and outcome.counts == {"FINISHED": 4}
    failures = tune_failures(study)
    assert sorted(failures.values()) == [0, 0, 0, 1], failures
    client, _, children = child_runs(study)
    assert len(children) == 4  # the retried trial kept its MLflow run
    retried = [run for run in children if run.data.tags.get("attempts") == "2"]
    assert len(retried) == 1 and "previous_error" in retried[0].data.tags, [r.data.tags for r in children]
    for run in children:
        assert run.info.status == "FINISHED" and "error" not in run.data.tags
        for key in ("val_mss_mean", "train_mss", "epoch_seconds"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], (key, run.data.tags)


def test_random_search_samples_uniform_int_and_choice_inside_their_bounds_and_logs_them(random_study):
    study, _, _, _ = random_study
    _, _, children = child_runs(study)
    for run in children:
        params = run.data.params
        assert 5e-4 <= float(params["train.lr"]) <= 2e-3
        assert float(params["model.decoder.width"]).is_integer() and 12 <= int(params["model.decoder.width"]) <= 20
        assert params["model.decoder.core"] in ("gru", "bigru")
        assert params["train.seed"] == run.data.tags["seed"]
    assert len({run.data.params["train.lr"] for run in children}) >= 2  # drawn, not a constant


def test_random_search_repeats_each_sampled_configuration_over_the_seeds(random_study):
    study, _, _, _ = random_study
    _, _, children = child_runs(study)
    seeds: dict[tuple, list[str]] = {}
    for run in children:
        config = tuple(run.data.params[k] for k in RANDOM_SPACE)
        seeds.setdefault(config, []).append(run.data.params["train.seed"])
    assert sorted(sorted(s) for s in seeds.values()) == [["0", "1"], ["0", "1"]], seeds


def test_study_status_and_report_commands_on_the_random_study(random_study):
    study, _, _, tmp = random_study
    storage = str(tmp / "studies")
    status = cli("study", "status", "s", "--storage", storage, cwd=tmp)
    assert status.returncode == 0, status.stderr[-3000:]
    lines = status.stdout.splitlines()
    assert "4 trials (4 finished)" in lines[0] and [line for line in lines if line.startswith("best so far")], lines
    _, _, children = child_runs(study)
    for run in children:
        assert [line for line in lines if run.data.tags["trial_name"] in line and "FINISHED" in line], lines
    report = cli("study", "report", "s", "--storage", storage, cwd=tmp)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "# Study s" in report.stdout and "report written to" in report.stdout
    configurations = (tmp / "studies" / "s" / "report" / "s_report.md").read_text().split("## ")[1]
    rows = [line for line in configurations.splitlines() if line.startswith("| ") and "core=" in line]
    assert len(rows) == len({r.data.tags["config_group"] for r in children})
    assert sum(int(row.split("|")[2]) for row in rows) == 4  # the seeds column covers every trial


def test_promote_command_with_where_registers_the_best_trial_that_meets_it(random_study):
    from mlflow.tracking import MlflowClient

    study, _, _, tmp = random_study
    client, _, children = child_runs(study)
    values = {}
    for run in children:
        epoch = int(run.data.tags["best_epoch"])
        values[run.data.tags["trial_name"]] = [m.value for m in client.get_metric_history(run.info.run_id, "val_mss_mean")
                                               if m.step == epoch][-1]
    ranked = sorted(values, key=values.get)
    floor = values[ranked[1]] - 1e-9  # excludes the best trial: the second best is the winner
    out = cli("promote", "s", "--storage", str(tmp / "studies"), "--metric", "val_mss_mean",
              "--where", f"mss_mean >= {floor!r}", "--alias", "pick", cwd=tmp)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"promoted trial {ranked[1]} (val_mss_mean = " in out.stdout, out.stdout
    name = re.search(r" as (\S+) version 1; models:/\S+@pick now points to it", out.stdout).group(1)
    registry = MlflowClient(study.mlflow.tracking_uri)
    version = registry.get_model_version_by_alias(name, "pick")
    assert version.tags["trial"] == ranked[1] and version.tags["metric"] == "val_mss_mean"
    none = cli("promote", "s", "--storage", str(tmp / "studies"), "--where", "mss_mean < 0", cwd=tmp)
    assert none.returncode == 2 and "no finished trial" in none.stderr and "Traceback" not in none.stderr
    assert len(registry.search_model_versions(f"name='{name}'")) == 1


def test_promote_command_registers_under_diffcraft_study_or_the_name_given(random_study):
    study, _, _, tmp = random_study
    default = cli("promote", "s", "--storage", str(tmp / "studies"), "--alias", "default", cwd=tmp)
    assert default.returncode == 0, default.stderr[-3000:]
    assert "models:/diffcraft-s@default" in default.stdout, default.stdout
    named = cli("promote", "s", "--storage", str(tmp / "studies"), "--name", "random-named", "--alias", "named",
                cwd=tmp)
    assert named.returncode == 0, named.stderr[-3000:]
    assert "models:/random-named@named" in named.stdout


# --- the collapse guard: stop -----------------------------------------------------------------------

def test_collapse_guard_stop_ends_a_collapsed_trial_and_its_run_says_why(ray_local, synth_cache, tmp_path):
    """A joint VAE under a KL weight of 1000 has fewer active units than the floor (all 8) after
    its first epoch; patience 1, action stop: the trial ends there, FINISHED, tagged collapsed and
    ended_by=collapse_guard, with only that epoch logged, and its checkpoint still promotable."""
    path = write_study(tmp_path, synth_cache, concurrency=1,
                       run={"model": {"stage": "joint", "encoder": VAE}, "loss": {"kl": COLLAPSING_KL}},
                       collapse_guard={"min_active_units": ALL_UNITS_ACTIVE, "patience": 1, "action": "stop"})
    study = load_study(path)
    outcome = run_study(study, verbose=0)
    assert outcome.counts == {"FINISHED": 1}
    client, _, (run,) = child_runs(study)
    assert run.data.tags["collapsed"] == "true" and run.data.tags["ended_by"] == "collapse_guard"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0]
    assert run.data.metrics["val_active_units"] < ALL_UNITS_ACTIVE
    assert outcome.results[0].metrics["collapsed"] == 1.0 and outcome.results[0].metrics["epochs_done"] == 1
    assert "checkpoint/best.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    figures = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures.get("figures/latent_tsne.png", 0) > 5000 and figures.get("figures/latent_interpolation.png", 0) > 5000
    # the test split (one clip here: no spread) scored at the selected checkpoint
    for key in ("test_mss_mean", "test_f0_loss", "test_rpa", "test_loudness_mae_db", "test_kl", "test_n_clips"):
        assert key in run.data.metrics, key


# --- Optuna, resumed after a killed driver; the collapse guard penalising its objective -----------

OPTUNA_SAMPLES = 4
PENALTY = 1000.0


@pytest.fixture(scope="module")
def resumed_optuna_study(synth_cache, tmp_path_factory):
    """An Optuna study of 4 encoder-stage VAE trials (one at a time) whose collapse guard
    penalises: its driver's process group is SIGKILLed once a trial has finished, then
    `diffcraft study resume` finishes it."""
    tmp = tmp_path_factory.mktemp("optuna")
    path = write_study(tmp, synth_cache, concurrency=1,
                       run={"model": {"stage": "encoder", "encoder": VAE}, "loss": {"kl": COLLAPSING_KL}},
                       objective={"metric": "val_loss", "mode": "min"},
                       search={"algorithm": "optuna", "samples": OPTUNA_SAMPLES,
                               "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}},
                       collapse_guard={"min_active_units": ALL_UNITS_ACTIVE, "patience": 1, "action": "penalize",
                                       "penalty": PENALTY})
    study = load_study(path)
    started = time.time()
    log = open(tmp / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "diffcraft.cli", "study", "run", str(path)], cwd=tmp,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    optuna_db = study.location.local_path() / "optuna.db"
    deadline, states = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None and not ("COMPLETE" in states and "RUNNING" in states):
        time.sleep(0.1)  # killed as soon as the sampler has suggested the trial after a finished one
        try:
            with sqlite3.connect(f"file:{optuna_db}?mode=ro", uri=True, timeout=1) as db:
                states = [row[0] for row in db.execute("SELECT state FROM trials")]
        except sqlite3.Error:  # not created yet
            pass
    assert proc.poll() is None, f"the driver ended before the kill:\n{(tmp / 'driver.log').read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    before = child_runs(study)[2]
    resumed = cli("study", "resume", "s", "--storage", str(tmp / "studies"), cwd=tmp)
    print(f"optuna study, killed and resumed: {time.time() - started:.1f} s")
    return study, before, resumed


def test_optuna_study_resumed_after_a_killed_driver_keeps_the_samplers_history(resumed_optuna_study):
    """The study of every killed-driver promise: SIGKILLed with its trials, resumed to completion,
    each trial FINISHED in one run (no duplicate), each epoch logged once, no suggestion repeated."""
    import optuna

    study, before, resumed = resumed_optuna_study
    assert any(r.info.status == "FINISHED" for r in before), "no trial finished before the kill"
    assert sum(r.info.status == "FINISHED" for r in before) < OPTUNA_SAMPLES, "the study ended before the kill"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    client, parents, children = child_runs(study)
    assert len(parents) == 1 and len(children) == OPTUNA_SAMPLES
    assert all(r.info.status == "FINISHED" and r.data.tags["artifacts"] == "logged" for r in children)
    assert len({r.data.params["train.lr"] for r in children}) == OPTUNA_SAMPLES  # no suggestion repeated
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 1]
    opt = optuna.load_study(study_name="s", storage=f"sqlite:///{study.location.local_path() / 'optuna.db'}")
    complete = [t for t in opt.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == OPTUNA_SAMPLES, [(t.number, t.state, t.params) for t in opt.trials]
    assert sorted(t.params["train.lr"] for t in complete) == sorted(float(r.data.params["train.lr"]) for r in children)


def test_collapse_guard_penalize_adds_the_penalty_to_the_objective_the_search_sees(resumed_optuna_study):
    """Every trial collapsed (tagged so) and trained all its epochs; MLflow keeps the true
    val_loss, and Optuna received it plus the penalty."""
    import optuna

    study, _, _ = resumed_optuna_study
    client, _, children = child_runs(study)
    logged = {}
    for run in children:
        assert run.data.tags["collapsed"] == "true", run.data.tags
        assert run.data.metrics["val_active_units"] < ALL_UNITS_ACTIVE
        last = [m.value for m in client.get_metric_history(run.info.run_id, "val_loss") if m.step == 1][-1]
        assert last < PENALTY
        logged[float(run.data.params["train.lr"])] = last
    opt = optuna.load_study(study_name="s", storage=f"sqlite:///{study.location.local_path() / 'optuna.db'}")
    for trial in opt.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert trial.value == pytest.approx(logged[trial.params["train.lr"]] + PENALTY, rel=1e-6)


def test_collapse_guard_penalize_does_not_say_it_ended_the_trial(resumed_optuna_study):
    study, _, _ = resumed_optuna_study
    _, _, children = child_runs(study)
    assert [r.data.tags.get("ended_by") for r in children] == [None] * OPTUNA_SAMPLES


def test_optuna_storage_completes_every_sample_once_and_leaves_nothing_running(resumed_optuna_study):
    import optuna

    study, _, _ = resumed_optuna_study
    opt = optuna.load_study(study_name="s", storage=f"sqlite:///{study.location.local_path() / 'optuna.db'}")
    states = [t.state for t in opt.trials]
    described = [(t.number, t.state.name, t.params) for t in opt.trials]
    # the whole study ended: nothing stays RUNNING (a suggestion lost with the driver, re-suggested
    # by Tune after the resume, is marked FAIL), and every sample completed once
    assert optuna.trial.TrialState.RUNNING not in states, described
    assert states.count(optuna.trial.TrialState.COMPLETE) == OPTUNA_SAMPLES, described
    assert len(states) <= OPTUNA_SAMPLES + 1, described


def test_the_report_of_a_vae_study_shows_the_collapse_diagnostics(resumed_optuna_study):
    from diffcraft.study.report import write_report

    study, _, _ = resumed_optuna_study
    report = write_report(study).read_text()
    section = report.split("## Latent diagnostics")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith("| train.lr=")]
    assert len(rows) == OPTUNA_SAMPLES and "val_active_units" in section and "val_shuffle_gap" in section
    assert all(f" / {ALL_UNITS_ACTIVE} " in row for row in rows)  # active units out of every latent dimension
