"""Secrets stay out of what Ray logs and shows and out of study files: only endpoints cross the
runtime environment, a URL refers to a secret as `${VAR}`, resolved only where it is used."""
import pytest

from diffcraft import raytools
from diffcraft.envref import inline_secret, redacted, resolve
from diffcraft.errors import ConfigError
from diffcraft.model_uri import usable_tracking_uri
from diffcraft.study.search import optuna_storage
from diffcraft.study.studyfile import load_study
from tests.test_study import write_study

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAcanary", "AWS_SECRET_ACCESS_KEY": "canary-secret", "AWS_SESSION_TOKEN": "canary",
           "AWS_PROFILE": "laptop", "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/key.json",
           "MLFLOW_TRACKING_PASSWORD": "canary", "MLFLOW_TRACKING_TOKEN": "canary", "PGPASSWORD": "canary"}


def test_only_endpoints_and_regions_cross_the_runtime_env(monkeypatch):
    for key in raytools.FORWARDED_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in {**SECRETS, "AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(key, value)
    forwarded = raytools.forwarded_env(EXTRA="1")
    assert forwarded == {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_REGION": "eu-west-1", "EXTRA": "1"}
    with pytest.raises(ValueError, match="never forwarded"):
        raytools.forwarded_env(PGPASSWORD="x")


@pytest.mark.parametrize("url,what", [
    ("postgresql://user:hunter2@db:5432/optuna", "the password in the URL"),
    ("https://mlflow.example?token=abc", "the query parameter 'token'"),
    ("postgresql://user:${PGPASSWORD}@db:5432/optuna", None),
    ("${OPTUNA_URL}", None),
    ("s3://bucket/studies", None),
])
def test_inline_secrets_are_told_from_references(url, what):
    assert inline_secret(url) == what


def test_a_reference_is_resolved_where_used_and_kept_unresolved_in_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTUNA_DB", str(tmp_path / "optuna.db"))
    path = write_study(tmp_path, tmp_path / "cache", optuna={"storage": "sqlite:///${OPTUNA_DB}"},
                       search={"algorithm": "optuna", "space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}})
    study = load_study(path)
    assert study.plain()["optuna"]["storage"] == "sqlite:///${OPTUNA_DB}"  # what study.json and MLflow keep
    storage = optuna_storage(study)
    assert storage.url == f"sqlite:///{tmp_path / 'optuna.db'}" and (tmp_path / "optuna.db").exists()


def test_a_reference_to_a_variable_not_set_names_the_field_and_the_variable(monkeypatch):
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError, match=r"mlflow.tracking_uri: refers to \$\{NOT_SET_HERE\}, which is not set"):
        usable_tracking_uri("https://user:${NOT_SET_HERE}@mlflow.example")
    assert resolve("plain", "x") == "plain"


def test_messages_show_a_password_redacted():
    assert redacted("postgresql://u:hunter2@db/x") == "postgresql://u:***@db/x"


def test_a_ray_client_address_is_refused_pointing_at_ray_jobs():
    with pytest.raises(ConfigError, match=r"Ray Client is not supported.*diffcraft study submit"):
        raytools.check_address("ray://head:10001")
    raytools.check_address("auto")  # a driver on the cluster itself is fine
