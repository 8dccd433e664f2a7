"""One training run: data from the feature cache, the model of the chosen stage, per-epoch
evaluation, atomic checkpoints and resumption. No Ray or MLflow here: the study layer calls
`train` with an `on_epoch` callback and reports from it.
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
from diffcraft.errors import CheckpointError
from diffcraft.losses import MultiScaleSpectralLoss
from diffcraft.models.autoencoder import DiffCraft, ModelConfig
from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint
from diffcraft.train.config import RunConfig, load_run_config
from diffcraft.train.evaluate import evaluate
from diffcraft.train.objective import beta_at, loss_terms, total_loss

__all__ = ["TrainResult", "build_model", "describe_epoch", "load_run_config", "train"]


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    best: dict = field(default_factory=dict)
    step: int = 0

    def describe(self) -> str:
        return (f"run {self.run_dir}: {len(self.history)} epochs, {self.step} steps; best "
                f"{describe_epoch(self.best)}; checkpoints in {self.run_dir / 'checkpoints'}")


def describe_epoch(m: dict, epochs: int | None = None) -> str:
    """One progress line: the metrics a person reads first."""
    parts = [f"epoch {m.get('epoch', -1) + 1}" + (f"/{epochs}" if epochs else "")]
    if "val_mss_mean" in m:
        parts.append(f"val_mss {m['val_mss_mean']:.4f} ± {m['val_mss_se']:.4f} (sd {m['val_mss_sd']:.4f})")
    if "val_rpa" in m:
        parts.append(f"rpa {m['val_rpa']:.3f} rca {m['val_rca']:.3f} loud_mae {m['val_loudness_mae_db']:.2f} dB")
    if "val_kl" in m:
        parts.append(f"kl {m['val_kl']:.3f} beta {m.get('beta', 0):.2g}")
    if "val_active_units" in m:
        parts.append(f"active {m['val_active_units']}/{m['val_latent_dims']}")
    if "audio_seconds_per_second" in m:
        parts.append(f"{m['audio_seconds_per_second']:.1f} audio-s/s")
    return "  ".join(parts)


def build_model(cfg: ModelConfig) -> DiffCraft:
    return DiffCraft(cfg)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_autocast(device: torch.device, precision: str) -> Callable:
    """A context factory: bf16 autocast of the networks, or a no-op for fp32."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def validation_loss(metrics: dict, cfg: RunConfig) -> float:
    """The weighted validation loss that picks the best checkpoint (KL left out)."""
    w = cfg.loss
    return (w.mss * metrics.get("val_mss_mean", 0.0) + w.f0 * metrics.get("val_f0_loss", 0.0)
            + w.loudness * metrics.get("val_loudness_loss", 0.0))


def init_weights(model: torch.nn.Module, path: str) -> int:
    """Copy the weights of checkpoint `path` whose names and shapes match (e.g. a pretrained
    encoder into a joint model); returns how many tensors were copied."""
    source = load_checkpoint(path)["model"]
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not matched:
        raise CheckpointError(f"{path}: no weight in it matches this model")
    model.load_state_dict(matched, strict=False)
    return len(matched)


class ShardSampler(torch.utils.data.Sampler):
    """Data parallelism: every rank draws the same epoch order (same seeded generator) and keeps
    every world-th index from its rank on, so the shards are disjoint and equally long."""

    def __init__(self, base, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __iter__(self):
        order = list(self.base)
        return iter(order[self.rank: len(order) - len(order) % self.world: self.world])

    def __len__(self) -> int:
        return len(self.base) // self.world


def _agree(stop: bool, world: int) -> bool:
    """Rank 0's decision to stop, shared with every rank."""
    if world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0])
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loaders(cfg: RunConfig, generator: torch.Generator, rank: int = 0, world: int = 1):
    train_set = ClipDataset(cfg.data.cache, "train")
    val_set = ClipDataset(cfg.data.cache, "validation")
    if cfg.data.validation_clips and cfg.data.validation_clips < len(val_set):
        val_set = Subset(val_set, range(cfg.data.validation_clips))
    n_train = cfg.data.clips_per_epoch or len(train_set)
    sampler = RandomSampler(train_set, replacement=bool(cfg.data.clips_per_epoch),
                            num_samples=n_train, generator=generator)
    if world > 1:
        sampler = ShardSampler(sampler, rank, world)
    batch = min(cfg.data.batch_size, max(1, len(sampler)))
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
    Inside an initialised torch.distributed group (e.g. a Ray Train worker) the model is wrapped in
    DistributedDataParallel and each rank trains on its shard of every epoch (`data.batch_size` is
    per rank); rank 0 evaluates and writes checkpoints; `on_epoch` runs on every rank (the others
    get only epoch and step) and rank 0's answer to stop is broadcast.
    """
    run_dir = Path(out_dir) if out_dir else Path(cfg.out_dir) / cfg.name
    ckpt_dir = run_dir / "checkpoints"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    rank, world = distributed_rank_world()
    model = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    mss_fn = MultiScaleSpectralLoss()
    autocast = make_autocast(device, cfg.train.precision)
    train_loader, val_loader = make_loaders(cfg, generator, rank, world)
    total_steps = cfg.train.epochs * len(train_loader)

    result = TrainResult(run_dir)
    start_epoch, extra = 0, dict(extra_state or {})
    if (ckpt_dir / "last.pt").is_file():
        state = load_checkpoint(ckpt_dir / "last.pt", str(device))
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{ckpt_dir / 'last.pt'}: does not fit this run's config, so it cannot "
                                  f"be resumed ({str(err).splitlines()[0]}); use another run folder") from None
        torch.set_rng_state(state["rng"])
        generator.set_state(state["sampler_rng"])
        result.history, result.best, result.step = state["history"], state["best"], state["step"]
        start_epoch = state["epoch"] + 1
        extra = {**state.get("extra", {}), **extra}
        if progress:
            print(f"resuming {run_dir} after epoch {state['epoch']} (step {result.step})")
    elif cfg.train.init_from:
        init_weights(model, cfg.train.init_from)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    for epoch in range(start_epoch, cfg.train.epochs):
        started, sums, n_steps = time.time(), {}, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
                   disable=not progress, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * cfg.train.lr_decay ** (result.step / cfg.train.lr_decay_steps)
            beta = beta_at(cfg.loss, result.step, total_steps)
            with autocast():
                out = net(batch["audio"], batch["f0_hz"], batch["loudness_db"])
            terms = loss_terms(out, batch, mss_fn)
            loss = total_loss(terms, cfg, beta)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}, step {result.step}: training loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            result.step += 1
            n_steps += 1
            logged = {"train_loss": loss.item(), **({"beta": beta} if model.is_vae else {})}
            for name, value in terms.items():
                logged["train_kl" if name == "kl_per_dim" else f"train_{name}"] = float(value.detach().sum())
            for key, value in logged.items():
                sums[key] = sums.get(key, 0.0) + value
            bar.set_postfix(loss=f"{loss.item():.3f}")
        train_seconds = time.time() - started
        if rank != 0:  # rank 0 evaluates, keeps the history and writes the checkpoints
            result.history.append({"epoch": epoch, "step": result.step})
            stop = bool(on_epoch({"epoch": epoch, "step": result.step}, ckpt_dir / "last.pt")) if on_epoch else False
            if _agree(stop, world):
                break
            continue
        metrics = {"epoch": epoch, "step": result.step, "lr": optimizer.param_groups[0]["lr"],
                   **{k: v / max(1, n_steps) for k, v in sums.items()}, "epoch_seconds": train_seconds,
                   "audio_seconds_per_second": world * n_steps * train_loader.batch_size * CLIP_SAMPLES
                   / SAMPLE_RATE / max(train_seconds, 1e-9),
                   **evaluate(model, val_loader, mss_fn, device, autocast)}
        metrics["val_loss"] = validation_loss(metrics, cfg)
        if not math.isfinite(metrics["val_loss"]):
            raise FloatingPointError(f"epoch {epoch}: validation loss is {metrics['val_loss']}")
        result.history.append(metrics)
        improved = not result.best or metrics["val_loss"] < result.best["val_loss"]
        if improved:
            result.best = dict(metrics)
        state = {"config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch, "step": result.step, "history": result.history, "best": result.best,
                 "rng": torch.get_rng_state(), "sampler_rng": generator.get_state(), "extra": extra}
        if improved:
            save_checkpoint(ckpt_dir / "best.pt", state)
        last = save_checkpoint(ckpt_dir / "last.pt", state)
        if progress:
            print(describe_epoch(metrics, cfg.train.epochs))
        stop = bool(on_epoch(metrics, last)) if on_epoch is not None else False
        if _agree(stop, world):
            break
    return result
