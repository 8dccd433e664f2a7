"""One training run: data from the feature cache, the model, per-epoch evaluation, atomic
checkpoints and resumption. No Ray or MLflow here: the study layer calls `train` with an
`on_epoch` callback and reports from it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, RandomSampler, Subset
from tqdm.auto import tqdm

from diffcraft import CLIP_SAMPLES, SAMPLE_RATE
from diffcraft.data.dataset import ClipDataset
from diffcraft.losses import MultiScaleSpectralLoss
from diffcraft.models.decoder import DDSPDecoder
from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint
from diffcraft.train.config import ModelConfig, RunConfig, load_run_config
from diffcraft.train.metrics import mean_se_sd

__all__ = ["TrainResult", "build_model", "evaluate", "load_run_config", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    best: dict = field(default_factory=dict)
    step: int = 0

    def describe(self) -> str:
        best = self.best
        return (f"run {self.run_dir}: {len(self.history)} epochs, {self.step} steps; best epoch "
                f"{best.get('epoch')} val_mss {best.get('val_mss_mean', float('nan')):.4f} "
                f"± {best.get('val_mss_se', float('nan')):.4f} (sd {best.get('val_mss_sd', float('nan')):.4f}); "
                f"checkpoints in {self.run_dir / 'checkpoints'}")


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    return DDSPDecoder(cfg.decoder)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def evaluate(model, loader, loss_fn, device, precision: str = "fp32") -> dict[str, float]:
    """Per-clip MSS on `loader`: mean, standard error, standard deviation (noise seeded, so the
    same weights always score the same)."""
    model.eval()
    values = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, precision):
                out = model(batch["f0_hz"], batch["loudness_db"])
            values.append(loss_fn.per_example(out["audio"].float(), batch["audio"]).cpu())
    model.train()
    mean, se, sd = mean_se_sd(torch.cat(values))
    return {"val_mss_mean": mean, "val_mss_se": se, "val_mss_sd": sd}


def _loaders(cfg: RunConfig, generator: torch.Generator):
    train_set = ClipDataset(cfg.data.cache, "train")
    val_set = ClipDataset(cfg.data.cache, "validation")
    if cfg.data.validation_clips and cfg.data.validation_clips < len(val_set):
        val_set = Subset(val_set, range(cfg.data.validation_clips))
    n_train = cfg.data.clips_per_epoch or len(train_set)
    sampler = RandomSampler(train_set, replacement=bool(cfg.data.clips_per_epoch),
                            num_samples=n_train, generator=generator)
    batch = min(cfg.data.batch_size, n_train)
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=True,
                              num_workers=cfg.data.num_workers)
    val_loader = DataLoader(val_set, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers)
    return train_loader, val_loader


def train(cfg: RunConfig, out_dir: str | Path | None = None, progress: bool = True,
          on_epoch: Callable[[dict, Path], bool | None] | None = None,
          extra_state: dict | None = None) -> TrainResult:
    """Train `cfg`, resuming from out_dir/checkpoints/last.pt when it exists.

    `on_epoch(metrics, checkpoint_path)` runs after each epoch's checkpoint is written; returning
    True stops the run. `extra_state` (e.g. a tracking run id) is kept in every checkpoint.
    """
    run_dir = Path(out_dir) if out_dir else Path(cfg.out_dir) / cfg.name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    loss_fn = MultiScaleSpectralLoss()
    train_loader, val_loader = _loaders(cfg, generator)

    result = TrainResult(run_dir)
    start_epoch, extra = 0, dict(extra_state or {})
    if (ckpt_dir / "last.pt").is_file():
        state = load_checkpoint(ckpt_dir / "last.pt", str(device))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        generator.set_state(state["sampler_rng"])
        result.history, result.best, result.step = state["history"], state["best"], state["step"]
        start_epoch = state["epoch"] + 1
        extra = {**state.get("extra", {}), **extra}
        if progress:
            print(f"resuming {run_dir} after epoch {state['epoch']} (step {result.step})")

    for epoch in range(start_epoch, cfg.train.epochs):
        started, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=not progress, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * cfg.train.lr_decay ** (result.step / cfg.train.lr_decay_steps)
            with _autocast(device, cfg.train.precision):
                out = model(batch["f0_hz"], batch["loudness_db"])
            loss = loss_fn(out["audio"].float(), batch["audio"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}, step {result.step}: training loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            result.step += 1
            losses.append(loss.item())
            bar.set_postfix(mss=f"{loss.item():.3f}")
        train_seconds = time.time() - started
        metrics = {"epoch": epoch, "step": result.step, "train_mss": sum(losses) / max(1, len(losses)),
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": train_seconds,
                   "audio_seconds_per_second": len(losses) * train_loader.batch_size * CLIP_SAMPLES
                   / SAMPLE_RATE / max(train_seconds, 1e-9),
                   **evaluate(model, val_loader, loss_fn, device, cfg.train.precision)}
        if not math.isfinite(metrics["val_mss_mean"]):
            raise FloatingPointError(f"epoch {epoch}: validation MSS is {metrics['val_mss_mean']}")
        result.history.append(metrics)
        improved = not result.best or metrics["val_mss_mean"] < result.best["val_mss_mean"]
        if improved:
            result.best = dict(metrics)
        state = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "step": result.step, "history": result.history, "best": result.best,
                 "rng": torch.get_rng_state(), "sampler_rng": generator.get_state(), "extra": extra}
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", state)
        last = save_checkpoint(ckpt_dir / "last.pt", state)
        if progress:
            print(f"epoch {epoch + 1}/{cfg.train.epochs}  train_mss {metrics['train_mss']:.4f}  val_mss "
                  f"{metrics['val_mss_mean']:.4f} ± {metrics['val_mss_se']:.4f} (sd {metrics['val_mss_sd']:.4f})  "
                  f"{metrics['audio_seconds_per_second']:.1f} audio-s/s")
        if on_epoch is not None and on_epoch(metrics, last):
            break
    return result
