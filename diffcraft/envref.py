"""Secrets stay out of study files: a URL may name an environment variable (`${PGPASSWORD}`),
resolved only where the URL is used, so files, params, artifacts and job records keep the
reference. A password written inline is refused, naming the field and the `${VAR}` form."""
from __future__ import annotations

import os
import re
from urllib.parse import parse_qsl, urlparse

from diffcraft.errors import ConfigError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "access_key", "secret_access_key")


def resolve(value: str, field: str) -> str:
    """`value` with every `${VAR}` replaced by this process's environment; a missing variable is
    an error naming the field and the variable."""
    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{field}: refers to ${{{name}}}, which is not set in this process's environment "
                              "(set it on the machine that runs the study, never in the study file)")
        return os.environ[name]

    return REFERENCE.sub(lookup, value)


def inline_secret(value: str) -> str | None:
    """What of `value` is a secret written inline (a URL's password or a secret query key), or None;
    `${VAR}` references are not secrets."""
    if "://" not in value:
        return None
    parsed = urlparse(value)
    if parsed.password and not REFERENCE.fullmatch(parsed.password):
        return "the password in the URL"
    for key, item in parse_qsl(parsed.query):
        if key.lower() in SECRET_QUERY_KEYS and item and not REFERENCE.fullmatch(item):
            return f"the query parameter {key!r}"
    return None


ADVICE = {  # field -> how to give that secret instead
    "optuna.storage": "write it as a reference, e.g. postgresql://user:${PGPASSWORD}@host/db, and set PGPASSWORD",
    "mlflow.tracking_uri": "drop it from the URI and set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                           "(or MLFLOW_TRACKING_TOKEN)"}


def refuse_inline_secret(value: str, field: str) -> None:
    """Raise when `value` holds a secret inline, saying what to write instead."""
    what = inline_secret(value)
    if what:
        advice = ADVICE.get(field, "write it as a ${VAR} reference and set VAR")
        raise ConfigError(f"{field}: holds {what} inline, and a study file is logged to MLflow and travels with its "
                          f"jobs; {advice} in the environment of the machines that run the study")


def redacted(value: str) -> str:
    """`value` with a URL's password shown as ***, for messages."""
    parsed = urlparse(value) if "://" in value else None
    if parsed is None or not parsed.password:
        return value
    return value.replace(f":{parsed.password}@", ":***@", 1)
