"""Study files: what to train, what to search, how to run it, where to log. Validated whole before
anything starts; every error names the field and the value.

```yaml
name: decoder_ablation
run: {data: {...}, model: {...}, loss: {...}, train: {...}}   # the base run config
search:
  algorithm: grid                     # optuna | grid | random
  space:                              # dotted run-config field -> one distribution
    model.decoder.core: {grid: [gru, mamba, bigru, bimamba]}
    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  samples: 1                          # optuna/random: trials drawn; grid: repeats of the grid
  seeds: 3                            # seeds per configuration (a grid over train.seed)
objective: {metric: val_mss_mean, mode: min}
scheduler: {kind: asha, grace_epochs: 2, reduction_factor: 2}
resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
concurrency: 2
mlflow: {tracking_uri: "", experiment: ""}   # "" = sqlite file mlflow.db here / the study name
optuna: {storage: ""}                 # "" = optuna.db in a local storage folder; or an RDB URL
storage: studies                      # a folder, a shared mount, or s3://bucket/prefix, gs://...
```
On a cluster, `storage` and `run.data.cache` must be reachable from every node (an object store
or a shared mount) and `mlflow.tracking_uri` a tracking server.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from diffcraft.typed_yaml import apply_overrides, from_dict, json_schema, load_yaml, set_dotted
from diffcraft.errors import ConfigError
from diffcraft.storage import Location, absolute, is_remote
from diffcraft.train.config import RunConfig
from diffcraft.train.stages import clip_fit_problems, ignores, scalar_metric_names

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice", "grid")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyConfigError(ConfigError):
    """A study file field that is unknown, ill-typed, out of range or unschedulable."""


@dataclass
class SearchConfig:
    algorithm: Literal["optuna", "grid", "random"] = "grid"  # optuna: TPE; grid: every combination; random: draws
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # dotted run-config field -> one distribution
    samples: int = 1  # optuna/random: trials drawn; grid: repeats of the grid
    seeds: int = 1  # seeds per configuration (a grid over train.seed)
    match_parameters: bool = False  # each trial's model.decoder.width set so it has the run: model's parameters

    JSON_SCHEMA: ClassVar[dict] = {"space": {  # what an editor offers under search.space
        "type": "object", "description": "dotted run-config field -> one distribution",
        "additionalProperties": {"type": "object", "minProperties": 1, "maxProperties": 1,
                                 "additionalProperties": False, "properties": {
                                     kind: {"type": "array", "minItems": 1} for kind in DISTRIBUTIONS}}}}


@dataclass
class ObjectiveConfig:
    metric: str = "val_loss"  # any per-epoch metric, e.g. val_mss_mean, val_rpa, val_loss
    mode: Literal["min", "max"] = "min"


def best_of(items, key, mode: str):
    """The item whose key is smallest (mode min) or largest (mode max)."""
    return (min if mode == "min" else max)(items, key=key)


@dataclass
class SchedulerConfig:
    kind: Literal["fifo", "asha"] = "fifo"
    grace_epochs: int = 1  # asha: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # asha: keep 1 / reduction_factor of the trials at each rung


@dataclass
class ResourcesConfig:
    workers: int = 1  # Ray Train workers per trial (data parallel; the global batch stays data.batch_size)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class CollapseGuardConfig:
    min_active_units: int = 0  # 0 turns the guard off
    patience: int = 3  # epochs in a row below the floor before the guard acts
    action: Literal["stop", "penalize"] = "stop"  # stop: end the trial; penalize: objective + `penalty`
    penalty: float = 1000.0


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = sqlite:///<absolute path of the working directory>/mlflow.db
    experiment: str = ""  # "" = the study name


@dataclass
class OptunaConfig:
    storage: str = ""  # "" = optuna.db in a local storage folder (kept in Tune's state otherwise); or an RDB URL


@dataclass
class StudyConfig:
    name: str
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    concurrency: int = 1  # trials at once
    max_retries: int = 0  # times a failed trial is restarted (from its last checkpoint)
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    storage: str = "studies"  # the study lives in storage/name: a folder, a shared mount, s3://, gs://

    def validate(self, where: str = "") -> None:
        if not NAME.match(self.name):
            raise StudyConfigError(f"name: {self.name!r} must be letters, digits, '_', '-', '.'")
        base = self.run
        s = self.search
        if s.samples < 1 or s.seeds < 1:
            raise StudyConfigError(f"search.samples and search.seeds must be at least 1 (got {s.samples}, {s.seeds})")
        for key, spec in s.space.items():
            kind, values = parse_distribution(key, spec)
            if kind == "grid" and s.algorithm == "optuna":
                raise StudyConfigError(f"search.space.{key}: grid needs algorithm grid or random "
                                       "(Optuna samples: use choice)")
            for value in (values if kind in ("choice", "grid") else values[:1]):
                try:
                    run_config(base, {key: value})
                except ConfigError as err:
                    raise StudyConfigError(f"search.space.{key}: {value!r} does not fit the run config ({err})") from None
        if s.match_parameters and ("model.decoder.width" in s.space or base.model.stage == "encoder"):
            raise StudyConfigError("search.match_parameters: sets model.decoder.width, so the width cannot be searched "
                                   "and the model needs a decoder (model.stage decoder or joint)")
        if key_seed(s.space) and s.seeds > 1:
            raise StudyConfigError("search.seeds: train.seed is already in the search space")
        if s.seeds > 1 and s.algorithm == "optuna":
            raise StudyConfigError("search.seeds: repeating seeds needs algorithm grid or random")
        sch = self.scheduler
        if sch.grace_epochs < 1 or sch.reduction_factor < 2:
            raise StudyConfigError("scheduler.grace_epochs must be >= 1 and scheduler.reduction_factor >= 2")
        r = self.resources
        if r.workers < 1 or r.cpus_per_worker <= 0 or r.gpus_per_worker < 0:
            raise StudyConfigError(f"resources: workers >= 1, cpus_per_worker > 0, gpus_per_worker >= 0 "
                                   f"(got {r.workers}, {r.cpus_per_worker}, {r.gpus_per_worker})")
        if self.concurrency < 1 or self.max_retries < 0:
            raise StudyConfigError(f"concurrency must be >= 1 and max_retries >= 0 (got {self.concurrency}, {self.max_retries})")
        g = self.collapse_guard
        if g.min_active_units < 0 or g.patience < 1:
            raise StudyConfigError(f"collapse_guard: min_active_units >= 0, patience >= 1 "
                                   f"(got {g.min_active_units}, {g.patience})")
        self.check_trials()

    def check_trials(self) -> None:
        """What every trial will be, checked before any starts: the objective and the collapse
        guard's metric are ones its stage reports, every searched field is one it reads, and its
        sizes fit a training clip and split over the workers."""
        trials = variants(self)
        needed = {"objective.metric": self.objective.metric}
        if self.collapse_guard.min_active_units:
            needed["collapse_guard.min_active_units"] = "val_active_units"
        for field_name, metric in needed.items():
            lacking = [(params, cfg) for params, cfg in trials if metric not in scalar_metric_names(cfg)]
            if lacking:
                params, cfg = lacking[0]
                who = _trials_with(params if len(lacking) < len(trials) else {}, cfg)
                what = (f"{metric!r} is not a metric that {who} report" if field_name == "objective.metric" else
                        f"{self.collapse_guard.min_active_units} watches {metric}, which {who} do not report "
                        "(only an encoder has latents; 0 turns the guard off)")
                raise StudyConfigError(f"{field_name}: {what}; they report: "
                                       f"{', '.join(sorted(scalar_metric_names(cfg)))}")
        for params, cfg in trials:
            problems = clip_fit_problems(cfg)
            if cfg.data.batch_size % self.resources.workers:
                problems["data.batch_size"] = (f"{cfg.data.batch_size} (the global batch) does not split evenly over "
                                               f"resources.workers: {self.resources.workers}")
            for key, problem in problems.items():
                raise StudyConfigError(f"{'search.space.' if key in params else 'run.'}{key}: {problem}")
        for key in self.search.space:
            why = STUDY_IGNORED.get(key)
            reasons = [why] if why else [ignores(cfg, key) for _, cfg in trials]
            if all(reasons):
                raise StudyConfigError(f"search.space.{key}: no trial reads it ({reasons[0]}), so the search "
                                       "would train the same configuration again and again")

    def reported_metrics(self) -> set[str]:
        """The per-epoch metrics some trial of this study reports."""
        return set().union(*(scalar_metric_names(cfg) for _, cfg in variants(self)))

    def base_run(self) -> RunConfig:
        return copy.deepcopy(self.run)

    def plain(self) -> dict:
        """The study as plain JSON data: what study.json keeps and a submitted job carries."""
        return json.loads(json.dumps(asdict(self)))

    @property
    def location(self) -> Location:
        """Where everything the study persists lives: storage/name."""
        return Location.of(self.storage) / self.name


STUDY_IGNORED = {  # run-config fields a study sets itself -> why searching them changes nothing
    "name": "a trial's run is named by the study", "out_dir": "trials live in the study's storage",
    "train.device": "trials train on Ray Train's device (resources.gpus_per_worker)"}
MAX_VARIANTS = 4096


def variants(study: StudyConfig) -> list[tuple[dict, RunConfig]]:
    """(searched values, run config) for every combination of the searched choice and grid values
    and of the bounds of the searched ranges (the first MAX_VARIANTS): the trials a study can have,
    as far as their stage, latents and sizes go."""
    keys, options = [], []
    for key, spec in study.search.space.items():
        if key == "train.seed":
            continue
        kind, values = parse_distribution(key, spec)
        keys.append(key)
        options.append(values)
    out = []
    for combo in itertools.islice(itertools.product(*options), MAX_VARIANTS):
        params = dict(zip(keys, combo))
        try:
            out.append((params, trial_config(study, params)))
        except ConfigError as err:
            raise StudyConfigError(f"search.space: the combination {params} does not fit the run config "
                                   f"({err})") from None
    return out


def _trials_with(params: dict, cfg: RunConfig) -> str:
    """'the trials with model.stage=decoder', or 'this study's trials (model.stage: decoder)'."""
    if params:
        return "the trials with " + ", ".join(f"{k}={v}" for k, v in params.items())
    latent = f", model.encoder.latent: {cfg.model.encoder.latent}" if cfg.model.stage != "decoder" else ""
    return f"this study's trials (model.stage: {cfg.model.stage}{latent})"


def key_seed(space: dict) -> bool:
    return "train.seed" in space


def parse_distribution(key: str, spec) -> tuple[str, list]:
    """({'loguniform': [1e-4, 1e-2]}) -> ('loguniform', [1e-4, 1e-2]), checked."""
    where = f"search.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise StudyConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise StudyConfigError(f"{where}: {kind!r} is not one of {list(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise StudyConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("loguniform", "uniform", "int"):
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise StudyConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
        low, high = values
        if not low < high:
            raise StudyConfigError(f"{where}.{kind}: low {low} must be below high {high}")
        if kind == "loguniform" and low <= 0:
            raise StudyConfigError(f"{where}.loguniform: bounds must be positive, got {values!r}")
        if kind == "int" and not all(isinstance(v, int) for v in values):
            raise StudyConfigError(f"{where}.int: bounds must be integers, got {values!r}")
    return kind, values


def run_config(base: RunConfig, params: dict) -> RunConfig:
    """The base run config with dotted `params` applied (values already typed)."""
    data = asdict(base)
    for key, value in params.items():
        set_dotted(data, key, value)
    return from_dict(RunConfig, data)


def trial_config(study: StudyConfig, params: dict) -> RunConfig:
    """A trial's run config: the study's run with the trial's values, and with `search.
    match_parameters` the decoder width that gives it as many parameters as the run: model."""
    from diffcraft.models.sizing import matched_width, model_parameters

    cfg = run_config(study.run, params)
    if study.search.match_parameters:
        cfg.model.decoder.width = matched_width(cfg.model, model_parameters(study.run.model))
    return cfg


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest tail that no other key ends with: model.decoder.core -> core,
    or decoder.core beside model.encoder.core."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(other != key and (other == tail or other.endswith("." + tail)) for other in keys):
                break
        out[key] = tail
    return out


def _short_value(value) -> str:
    """3 significant digits for floats, very small or large ones as 3.16e-4."""
    if not isinstance(value, float) or value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}" if isinstance(value, float) else str(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def trial_label(params: dict) -> str:
    """A trial's name from what varies, short: 'core=bimamba lr=3.2e-4 seed=1' ('base' for none)."""
    names = short_keys(list(params))
    return " ".join(f"{names[k]}={_short_value(v)}" for k, v in params.items())[:250] or "base"


def config_hash(params: dict, without_seed: bool = False) -> str:
    """Short stable hash of a trial's parameters (seed left out: the configuration group)."""
    items = {k: v for k, v in params.items() if not (without_seed and k == "train.seed")}
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:12]


def absolute_paths(data: dict, root: Path) -> dict:
    """Make the study's paths absolute against `root` (where the command runs): trials run in
    other working directories, possibly on other machines. URIs stay as they are."""
    data = copy.deepcopy(data)
    data["storage"] = absolute(str(data.get("storage", "studies")), root)
    run = data.setdefault("run", {})
    cache = run.get("data", {}).get("cache")
    if isinstance(cache, str) and cache:
        run["data"]["cache"] = absolute(cache, root)
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


SCHEMA_KINDS = {"study": StudyConfig, "run": RunConfig}


def file_schema(kind: str = "study") -> dict:
    """JSON Schema (draft 2020-12) of a study file or a run config file, for editors (e.g. the
    YAML language server: `# yaml-language-server: $schema=study.schema.json`)."""
    if kind not in SCHEMA_KINDS:
        raise StudyConfigError(f"--kind {kind!r} is not one of {list(SCHEMA_KINDS)}")
    schema = json_schema(SCHEMA_KINDS[kind])
    title = {"study": "diffcraft study file", "run": "diffcraft run config"}[kind]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema, "title": title}
