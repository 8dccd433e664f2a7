"""A study file on disk: read (overrides applied, its paths made absolute, validated whole into a
`StudyConfig`), and described for editors as a JSON Schema."""
from __future__ import annotations

import copy
from pathlib import Path

from diffcraft.errors import ConfigError, StorageError, StudyConfigError
from diffcraft.storage import absolute, is_remote
from diffcraft.study.config import StudyConfig
from diffcraft.train.config import RunConfig
from diffcraft.typed_yaml import apply_overrides, from_dict, json_schema, load_yaml

SCHEMA_KINDS = {"study": StudyConfig, "run": RunConfig}


def _absolute(field: str, location: str, root: Path) -> str:
    try:
        return absolute(location, root)
    except StorageError as err:
        raise ConfigError(f"{field}: {err}") from None


def absolute_paths(data: dict, root: Path) -> dict:
    """Make the study's paths absolute against `root` (where the command runs): trials run in
    other working directories, possibly on other machines. URIs stay as they are."""
    data = copy.deepcopy(data)
    data["storage"] = _absolute("storage", str(data.get("storage", "studies")), root)
    run = data.setdefault("run", {})
    cache = run.get("data", {}).get("cache")
    if isinstance(cache, str) and cache:
        run["data"]["cache"] = _absolute("run.data.cache", cache, root)
    init = run.get("train", {}).get("init_from")
    if init:
        local = [absolute(p, root) if isinstance(p, str) and p and not is_remote(p) else p
                 for p in ([init] if isinstance(init, str) else init)]
        run["train"]["init_from"] = local[0] if isinstance(init, str) else local
    return data


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read and validate a study file; errors are prefixed with the file name. Relative paths
    inside it are taken from the current directory."""
    data = load_yaml(path)
    try:
        data = apply_overrides(data, list(overrides))
        if isinstance(data.get("run", {}), dict) and isinstance(data.get("run", {}).get("data", {}), dict):
            data = absolute_paths(data, Path.cwd())
        return from_dict(StudyConfig, data)
    except ConfigError as err:
        raise StudyConfigError(f"{path}: {err}") from None


def file_schema(kind: str = "study") -> dict:
    """JSON Schema (draft 2020-12) of a study file or a run config file, for editors (e.g. the
    YAML language server: `# yaml-language-server: $schema=study.schema.json`)."""
    if kind not in SCHEMA_KINDS:
        raise StudyConfigError(f"--kind {kind!r} is not one of {list(SCHEMA_KINDS)}")
    schema = json_schema(SCHEMA_KINDS[kind])
    title = {"study": "diffcraft study file", "run": "diffcraft run config"}[kind]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}
