"""The run config: one YAML file maps onto these dataclasses, and the logged config is the recipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from diffcraft.typed_yaml import apply_overrides, from_dict, load_yaml
from diffcraft.errors import ConfigError
from diffcraft.models.autoencoder import ModelConfig
from diffcraft.nn.scan import ScanName


@dataclass
class DataConfig:
    cache: str = "diffcraft-quickstart/cache"  # feature cache made by `diffcraft data prepare`
    batch_size: int = 16  # clips per optimiser step, over all data-parallel workers
    clips_per_epoch: int = 0  # training clips drawn per epoch (0: every training clip once)
    validation_clips: int = 0  # validation clips evaluated each epoch (0: all)
    num_workers: int = -1  # DataLoader worker processes (-1: 2 on a GPU, where loading overlaps the step; 0 on CPU)
    random_crops: bool = False  # training clips start a (seed, epoch)-drawn number of frames later; val/test stay fixed

    def validate(self, where: str = "") -> None:
        p = f"{where}." if where else ""
        if self.batch_size < 1:
            raise ConfigError(f"{p}batch_size: {self.batch_size} must be at least 1")
        for name in ("clips_per_epoch", "validation_clips"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{p}{name}: {getattr(self, name)} must not be negative")
        if self.num_workers < -1:
            raise ConfigError(f"{p}num_workers: {self.num_workers} must be -1 (automatic) or more")


@dataclass
class KLConfig:
    schedule: Literal["constant", "linear", "cyclical"] = "linear"
    beta: float = 1e-3  # KL weight reached (nats per frame, summed over latent dimensions)
    beta_start: float = 0.0  # weight at the start of a warm-up or of each cycle
    warmup_steps: int = 1000  # linear: steps from beta_start to beta
    cycles: int = 4  # cyclical: number of cycles over the whole run
    ratio: float = 0.5  # cyclical: share of each cycle spent rising
    free_bits: float = 0.0  # nats per dimension and frame below which KL gets no gradient

    def validate(self, where: str = "") -> None:
        p = f"{where}." if where else ""
        if self.beta < 0 or self.beta_start < 0 or self.free_bits < 0:
            raise ConfigError(f"{p}beta, beta_start and free_bits must not be negative")
        if not 0 < self.ratio <= 1 or self.cycles < 1:
            raise ConfigError(f"{p}ratio must be in (0, 1] and cycles at least 1")


@dataclass
class LossConfig:
    mss: float = 1.0  # weight of the multi-scale spectral loss (decoder and joint stages)
    f0: float = 1.0  # weight of the F0 bin cross-entropy (encoder and joint stages)
    loudness: float = 1.0  # weight of the loudness MSE + MAE
    kl: KLConfig = field(default_factory=KLConfig)  # VAE latents only


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 3e-4  # Adam learning rate
    lr_schedule: Literal["exponential", "step", "plateau"] = "exponential"  # when lr_decay is multiplied in
    lr_decay: float = 0.98  # factor per lr_decay_steps steps (exponential), per decay (step; plateau: below 1)
    lr_decay_steps: int = 10000  # exponential: lr * lr_decay ** (step / lr_decay_steps), set every step
    lr_step_epochs: int = 10  # step: lr * lr_decay ** (epoch // lr_step_epochs)
    lr_plateau_patience: int = 5  # plateau: epochs without improvement tolerated; the next one decays the lr
    lr_min: float = 0.0  # plateau: the floor the learning rate stops at
    grad_clip: float = 3.0  # global gradient-norm clip (0: off)
    seed: int = 0
    init_from: str | list[str] = ""  # checkpoint(s) whose matching weights start this run, one per module
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast of the networks; synthesis and loss stay fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # a standalone run's device (study trials: Ray Train's)
    scan: ScanName = "auto"  # Mamba's scan kernel (auto: mamba_ssm, else Triton on CUDA; numba on CPU)
    tf32: bool = True  # CUDA: TensorFloat-32 matrix products and convolutions in fp32 runs (off: exact fp32)
    threads: int = 0  # torch CPU threads (0: leave as is)

    def validate(self, where: str = "") -> None:
        p = f"{where}." if where else ""
        if self.epochs < 1:
            raise ConfigError(f"{p}epochs: {self.epochs} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"{p}lr: {self.lr} must be positive")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"{p}lr_decay: {self.lr_decay} must be in (0, 1]")
        if self.lr_schedule == "plateau" and self.lr_decay == 1:
            raise ConfigError(f"{p}lr_decay: 1.0 never lowers the learning rate; the plateau schedule needs a "
                              f"factor below 1")
        for name in ("lr_decay_steps", "lr_step_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{p}{name}: {getattr(self, name)} must be at least 1")
        if self.lr_plateau_patience < 0:
            raise ConfigError(f"{p}lr_plateau_patience: {self.lr_plateau_patience} must not be negative")
        if self.lr_min < 0:
            raise ConfigError(f"{p}lr_min: {self.lr_min} must not be negative")
        for i, path in enumerate(self.init_paths):
            if not path:
                raise ConfigError(f"{p}init_from[{i}]: an empty path")

    @property
    def init_paths(self) -> list[str]:
        """`init_from` as a list: no checkpoint, one or several."""
        if isinstance(self.init_from, str):
            return [self.init_from] if self.init_from else []
        return list(self.init_from)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run's folder is out_dir/name
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (or the defaults) plus overrides; errors name the field."""
    data = load_yaml(path) if path else {}
    try:
        return from_dict(RunConfig, apply_overrides(data, list(overrides)))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
