"""What a study file holds: what to train, what to search, how to run it, where to log; and when
it is valid. Validated whole before anything starts (including every trial the search can
produce against its stage); every error names the field and the value.

```yaml
name: decoder_ablation
run: {data: {...}, model: {...}, loss: {...}, train: {...}}   # the base run config
search: {algorithm: grid, space: {...}, samples: 1, seeds: 3}  # see study.space
objective: {metric: val_mss_mean, mode: min}
scheduler: {kind: asha, grace_epochs: 2, reduction_factor: 2}
resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0,
            worker_start_timeout_s: 600, controller_failure_limit: 3}  # waiting for nodes
concurrency: 2
mlflow: {tracking_uri: "", experiment: ""}   # "" = sqlite file mlflow.db here / the study name
optuna: {storage: ""}                 # "" = optuna.db in a local storage folder; or an RDB URL
report: {baseline: "", equivalence: {mss_mean: 0.05}}  # compare to the best (or this one); TOST margins
storage: studies                      # a folder, a shared mount, or s3://bucket/prefix, gs://...
```
On a cluster, `storage` and `run.data.cache` must be reachable from every node (an object store
or a shared mount) and `mlflow.tracking_uri` a tracking server.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from diffcraft.envref import refuse_inline_secret
from diffcraft.errors import ConfigError, StorageError, StudyConfigError
from diffcraft.storage import Location, check_location_shape
from diffcraft.study.space import SEED, SearchConfig
from diffcraft.train.config import RunConfig
from diffcraft.train.names import VAL_ACTIVE_UNITS, headline_names
from diffcraft.train.selection import Objective
from diffcraft.train.stages import clip_fit_problems, ignores, scalar_metric_names
from diffcraft.typed_yaml import to_plain

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STUDY_IGNORED = {  # run-config fields a study sets itself -> why searching them changes nothing
    "name": "a trial's run is named by the study", "out_dir": "trials live in the study's storage",
    "train.device": "trials train on Ray Train's device (resources.gpus_per_worker)"}


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
    # how long a trial's workers may wait for their nodes, a try: an autoscaler starts a GPU node in minutes
    worker_start_timeout_s: float = 600.0
    # tries after the first that may time out (or fail to start) before the trial fails; -1: never fail
    controller_failure_limit: int = 3


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
class ReportConfig:
    baseline: str = ""  # what the others are compared to ("model.decoder.core=gru"); "" = the best by the objective
    equivalence: dict[str, float] = field(default_factory=dict)  # metric -> TOST margin of "no difference"
    factorial: bool = False  # main effects and interaction of two searched dimensions (automatic for a grid)


@dataclass
class StudyConfig:
    name: str
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    objective: Objective = field(default_factory=Objective)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    concurrency: int = 1  # trials at once
    max_retries: int = 0  # times a failed trial is restarted (from its last checkpoint)
    collapse_guard: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    storage: str = "studies"  # the study lives in storage/name: a folder, a shared mount, s3://, gs://

    def validate(self, where: str = "") -> None:
        if not NAME.match(self.name):
            raise StudyConfigError(f"name: {self.name!r} must be letters, digits, '_', '-', '.'")
        self._check_locations()
        self._check_search()
        self._check_running()
        self._check_report()
        self.check_trials()

    def _check_locations(self) -> None:
        """No secret inline in any URL (a `${VAR}` reference instead), and every storage URI with
        a scheme this project reads and a bucket."""
        urls = {"optuna.storage": self.optuna.storage, "mlflow.tracking_uri": self.mlflow.tracking_uri,
                "storage": self.storage, "run.data.cache": self.run.data.cache}
        for field_name, value in urls.items():
            try:
                refuse_inline_secret(value, field_name)
            except ConfigError as err:
                raise StudyConfigError(str(err)) from None
        for field_name in ("storage", "run.data.cache"):
            try:
                check_location_shape(urls[field_name])
            except StorageError as err:
                raise StudyConfigError(f"{field_name}: {err}") from None

    def _check_search(self) -> None:
        s = self.search
        if s.samples < 1 or s.seeds < 1:
            raise StudyConfigError(f"search.samples and search.seeds must be at least 1 (got {s.samples}, {s.seeds})")
        for key, dimension in s.space.items():
            if dimension.kind == "grid" and s.algorithm == "optuna":
                raise StudyConfigError(f"search.space.{key}: grid needs algorithm grid or random "
                                       "(Optuna samples: use choice)")
            for value in dimension.corners():
                try:
                    s.trial_config(self.run, {key: value})
                except ConfigError as err:
                    raise StudyConfigError(f"search.space.{key}: {value!r} does not fit the run config ({err})") from None
        if s.match_parameters and ("model.decoder.width" in s.space or not self.run.model.has_decoder):
            raise StudyConfigError("search.match_parameters: sets model.decoder.width, so the width cannot be searched "
                                   "and the model needs a decoder (model.stage decoder or joint)")
        if SEED in s.space and s.seeds > 1:
            raise StudyConfigError("search.seeds: train.seed is already in the search space")
        if s.seeds > 1 and s.algorithm == "optuna":
            raise StudyConfigError("search.seeds: repeating seeds needs algorithm grid or random")

    def _check_running(self) -> None:
        sch, r, g = self.scheduler, self.resources, self.collapse_guard
        if sch.grace_epochs < 1 or sch.reduction_factor < 2:
            raise StudyConfigError("scheduler.grace_epochs must be >= 1 and scheduler.reduction_factor >= 2")
        if r.workers < 1 or r.cpus_per_worker <= 0 or r.gpus_per_worker < 0:
            raise StudyConfigError(f"resources: workers >= 1, cpus_per_worker > 0, gpus_per_worker >= 0 "
                                   f"(got {r.workers}, {r.cpus_per_worker}, {r.gpus_per_worker})")
        if r.worker_start_timeout_s <= 0:
            raise StudyConfigError(f"resources.worker_start_timeout_s: must be > 0 seconds (got {r.worker_start_timeout_s})")
        if r.controller_failure_limit < -1:
            raise StudyConfigError("resources.controller_failure_limit: must be >= 0, or -1 to retry the start "
                                   f"forever (got {r.controller_failure_limit})")
        if self.concurrency < 1 or self.max_retries < 0:
            raise StudyConfigError(f"concurrency must be >= 1 and max_retries >= 0 (got {self.concurrency}, {self.max_retries})")
        if g.min_active_units < 0 or g.patience < 1:
            raise StudyConfigError(f"collapse_guard: min_active_units >= 0, patience >= 1 "
                                   f"(got {g.min_active_units}, {g.patience})")

    def _check_report(self) -> None:
        known = headline_names()
        for metric, margin in self.report.equivalence.items():
            if metric not in known:
                raise StudyConfigError(f"report.equivalence.{metric}: not a metric the report compares; "
                                       f"one of {', '.join(known)}")
            if not (margin > 0 and math.isfinite(margin)):
                raise StudyConfigError(f"report.equivalence.{metric}: the margin must be a positive number "
                                       f"(got {margin})")
        for part in filter(None, (p.strip() for p in self.report.baseline.split(","))):
            key = part.split("=", 1)[0]
            if "=" not in part or key not in self.search.space:
                raise StudyConfigError(f"report.baseline: {part!r} is not key=value of a searched dimension "
                                       f"({', '.join(self.search.space) or 'none is searched'})")

    def check_trials(self) -> None:
        """What every trial will be, checked before any starts: the objective and the collapse
        guard's metric are ones its stage reports, every searched field is one it reads, and its
        sizes fit a training clip and split over the workers."""
        trials = self.variants()
        self._check_metrics(trials)
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

    def _check_metrics(self, trials: list[tuple[dict, RunConfig]]) -> None:
        needed = {"objective.metric": self.objective.metric}
        if self.collapse_guard.min_active_units:
            needed["collapse_guard.min_active_units"] = VAL_ACTIVE_UNITS
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

    def variants(self) -> list[tuple[dict, RunConfig]]:
        """The trials the search can produce (`SearchConfig.variants` of the base run)."""
        return self.search.variants(self.run)

    def trial_config(self, params: dict) -> RunConfig:
        """A trial's run config (`SearchConfig.trial_config` of the base run)."""
        return self.search.trial_config(self.run, params)

    def reported_metrics(self) -> set[str]:
        """The per-epoch metrics some trial of this study reports."""
        return set().union(*(scalar_metric_names(cfg) for _, cfg in self.variants()))

    def plain(self) -> dict:
        """The study as plain JSON data, as its file writes it: what study.json keeps and a
        submitted job carries."""
        return to_plain(self)

    @property
    def location(self) -> Location:
        """Where everything the study persists lives: storage/name."""
        return Location.of(self.storage) / self.name


def _trials_with(params: dict, cfg: RunConfig) -> str:
    """'the trials with model.stage=decoder', or 'this study's trials (model.stage: decoder)'."""
    if params:
        return "the trials with " + ", ".join(f"{k}={v}" for k, v in params.items())
    latent = f", model.encoder.latent: {cfg.model.encoder.latent}" if cfg.model.has_encoder else ""
    return f"this study's trials (model.stage: {cfg.model.stage}{latent})"
