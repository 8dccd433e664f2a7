"""The promoted model is an MLflow Model: pyfunc timbre transfer, the same as `diffcraft transfer`,
and served over HTTP by `mlflow models serve`."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from mlflow.tracking import MlflowClient

import diffcraft.transfer
from diffcraft.audio.io import load_audio
from diffcraft.cli import main as cli_main
from diffcraft.errors import CheckpointError
from diffcraft.model_uri import resolve_checkpoint
from diffcraft.study.promote import promote
from diffcraft.train.checkpoint import model_from_checkpoint
from tests.conftest import sine
from tests.test_promote import finished_study  # noqa: F401 - the module's study, a fixture

pytestmark = pytest.mark.slow  # the module's study: about 50 s to set up

NAME = "diffcraft-p-serving"  # a registered model of its own: versions numbered apart from test_promote's
PARAMS = {"pitch_shift": 3.0, "crepe_model": "tiny", "seed": 0}


@pytest.fixture(scope="module")
def champion(finished_study):  # noqa: F811
    """The promoted best trial, `models:/NAME@champion`, and the registry it lives in."""
    promotion = promote(finished_study, name=NAME)
    mlflow.set_tracking_uri(finished_study.mlflow.tracking_uri)
    return promotion, f"models:/{NAME}@{promotion.alias}", finished_study.mlflow.tracking_uri


@pytest.fixture()
def phrase(tmp_path) -> Path:
    """1.5 s of two tones, stereo at 22.05 kHz: `diffcraft transfer` and a `path` row resample it alike."""
    tone = np.concatenate([sine(262.0, 0.75, 0.5, 22050), sine(330.0, 0.75, 0.4, 22050)])
    sf.write(str(tmp_path / "phrase.wav"), np.stack([tone, 0.5 * tone], 1), 22050)
    return tmp_path / "phrase.wav"


def _model_id(champion) -> str:
    promotion, _, tracking_uri = champion
    source = MlflowClient(tracking_uri).get_model_version(promotion.name, promotion.version).source
    assert source.startswith("models:/m-"), source
    return source.removeprefix("models:/")


def test_the_champion_is_a_pyfunc_model_with_signature_example_and_checkpoint(champion):
    promotion, uri, tracking_uri = champion
    info = mlflow.models.get_model_info(uri)
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "diffcraft.serving" and pyfunc["data"] and not pyfunc.get("code")
    assert {c.name for c in info.signature.inputs.inputs} == {"audio", "path"}
    assert {p.name: p.default for p in info.signature.params.params} == {
        "pitch_shift": 0.0, "loudness_offset": 0.0, "f0": "auto", "crepe_model": "full", "seed": 0}
    assert info.saved_input_example_info["type"] == "dataframe"
    logged = MlflowClient(tracking_uri).get_logged_model(_model_id(champion))
    assert logged.source_run_id == promotion.run_id and logged.tags["trial"] == promotion.trial
    checkpoint = resolve_checkpoint(uri, tracking_uri)
    assert checkpoint.name == "best.pt" and model_from_checkpoint(checkpoint)[0].decoder is not None


def test_a_version_registered_as_a_bare_checkpoint_still_resolves(champion):
    promotion, _, tracking_uri = champion
    client = MlflowClient(tracking_uri)
    client.create_registered_model("diffcraft-p-bare")
    client.create_model_version("diffcraft-p-bare", source=f"runs:/{promotion.run_id}/checkpoint",
                                run_id=promotion.run_id)
    checkpoint = resolve_checkpoint("models:/diffcraft-p-bare/1", tracking_uri)
    assert checkpoint.name == "best.pt" and model_from_checkpoint(checkpoint)[0].decoder is not None


def test_pyfunc_predict_gives_the_audio_of_diffcraft_transfer(champion, phrase, tmp_path, monkeypatch):
    _, uri, tracking_uri = champion
    model = mlflow.pyfunc.load_model(uri)
    by_path = model.predict(pd.DataFrame({"path": [str(phrase)]}), params=PARAMS)["audio"][0]
    by_samples = model.predict(pd.DataFrame({"audio": [load_audio(phrase)]}), params=PARAMS)["audio"][0]
    np.testing.assert_array_equal(by_path, by_samples)
    assert by_path.dtype == np.float32 and len(by_path) == len(load_audio(phrase))

    # `diffcraft transfer` draws its noise from torch's global generator: seed it as predict does (CREPE
    # tiny, whose construction draws from it too, is loaded already, by predict)
    timbre_transfer = diffcraft.transfer.timbre_transfer

    def seeded(*args, **kwargs):
        torch.manual_seed(PARAMS["seed"])
        return timbre_transfer(*args, **kwargs)

    monkeypatch.setattr(diffcraft.transfer, "timbre_transfer", seeded)
    assert cli_main(["transfer", str(phrase), "--model", uri, "--tracking-uri", tracking_uri,
                     "--out", str(tmp_path / "out"), "--pitch-shift", "3", "--crepe-model", "tiny"]) == 0
    written, rate = sf.read(str(tmp_path / "out" / "phrase_transfer.wav"), dtype="float32")
    expected = by_path / max(1.0, float(np.abs(by_path).max()))  # the wav is peak-limited, 16-bit
    assert rate == 16000 and len(written) == len(by_path)
    assert np.abs(written - expected).max() <= 1.0 / 32768 and np.abs(expected).max() > 1e-3


def test_mlflow_models_serve_answers_a_scoring_request_with_audio(champion, tmp_path):
    _, uri, tracking_uri = champion
    audio = sine(220.0, 0.8, 0.5)
    expected = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"audio": [audio]}), params=PARAMS)["audio"][0]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                                   "local", "-h", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}, start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/ping", server, log, seconds=180)
        body = {"dataframe_split": {"columns": ["audio"], "data": [[audio.tolist()]]}, "params": PARAMS}
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", body)
        assert status == 200, answer
        served = np.asarray(answer["predictions"][0]["audio"], dtype=np.float32)
        assert len(served) == len(audio)
        assert np.abs(served - expected).max() <= 1e-4 * np.abs(expected).max() + 1e-6
        status, answer = _post(f"http://127.0.0.1:{port}/invocations",
                               {"dataframe_records": [{"samples": [0.1, 0.2]}]})
        assert status == 400 and "expected `audio`" in answer["message"]
    finally:
        _stop(server)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # nothing of the server's process group is left


def test_a_champion_whose_checkpoint_would_execute_code_is_refused(finished_study, tmp_path):  # noqa: F811
    promotion = promote(finished_study, name=NAME, alias="tampered")
    client = MlflowClient(finished_study.mlflow.tracking_uri)
    assert client.get_model_version_by_alias(NAME, "tampered").version == int(promotion.version)
    model_id = client.get_model_version(NAME, promotion.version).source.removeprefix("models:/")
    (stored,) = stored_model(client, model_id).rglob("best.pt")

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": "diffcraft-checkpoint", "model": Exploit()}, stored)
    uri = f"models:/{NAME}@tampered"
    with pytest.raises(CheckpointError, match="could execute code"):
        mlflow.pyfunc.load_model(uri)
    with pytest.raises(CheckpointError, match="could execute code"):
        model_from_checkpoint(resolve_checkpoint(uri, finished_study.mlflow.tracking_uri))
    assert not (tmp_path / "pwned").exists()


def stored_model(client, model_id: str) -> Path:
    """The folder of a logged model in the store (a local artifact folder here)."""
    return Path(unquote(urlparse(client.get_logged_model(model_id).artifact_location).path))


def test_loading_a_champion_runs_the_installed_diffcraft_and_refuses_a_changed_model(finished_study):  # noqa: F811
    import yaml

    import diffcraft.serving

    promotion = promote(finished_study, name=NAME, alias="edited")
    client = MlflowClient(finished_study.mlflow.tracking_uri)
    model_id = client.get_model_version(NAME, promotion.version).source.removeprefix("models:/")
    uri = f"models:/{NAME}@edited"
    loaded = mlflow.pyfunc.load_model(uri)
    assert type(loaded._model_impl) is diffcraft.serving.TimbreTransfer  # the installed module's class
    folder = stored_model(client, model_id)
    assert not (folder / "code").exists()  # no code is stored with the model
    mlmodel = folder / "MLmodel"
    meta = yaml.safe_load(mlmodel.read_text())
    assert meta["metadata"][diffcraft.serving.CODE_HASH] == diffcraft.serving.code_hash()
    edited = {**meta, "metadata": {diffcraft.serving.CODE_HASH: "sha256:" + "0" * 64}}
    mlmodel.write_text(yaml.safe_dump(edited))  # as if promoted by other diffcraft code
    with pytest.raises(CheckpointError, match=r"promoted by diffcraft code sha256:0{64}, but the installed diffcraft"):
        mlflow.pyfunc.load_model(uri)
    meta["flavors"]["python_function"]["code"] = "code"  # someone added code to the stored model
    mlmodel.write_text(yaml.safe_dump(meta))
    with pytest.raises(CheckpointError, match="carries its own code"):
        mlflow.pyfunc.load_model(uri)


def _wait_for(url: str, server: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer {url} within {seconds} s")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the CLI and its uvicorn), SIGKILL what is left after 20 s."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
