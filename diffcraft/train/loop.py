"""One training run: the model of the chosen stage, trained epoch by epoch on the feature cache,
evaluated on the validation clips, committed through its session. No Ray or MLflow here: a
session (`train.session`) says where the run lives, and the study layer brings its own.

    state = start(cfg, session)           # model, optimizer, loaders; resumed if a commit exists
    for epoch in remaining epochs:
        sums = train_epoch(run, epoch)    # every rank: its shard of the epoch
        metrics = epoch_metrics(run, ...) # rank 0: training averages + validation
        schedule_epoch(run, metrics)      # every rank: a plateau schedule reads the selection metric
        stop = commit(run, metrics)       # persisted (and logged) before the next epoch starts
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from diffcraft import CLIP_SAMPLES, SAMPLE_RATE
from diffcraft.errors import CheckpointError
from diffcraft.losses import MultiScaleSpectralLoss
from diffcraft.models.autoencoder import DiffCraft
from diffcraft.nn.mamba import Mamba
from diffcraft.nn.scan import announce_scan, use_scan
from diffcraft.train import names
from diffcraft.train.checkpoint import describe_init, init_weights, rng_state, set_rng_state
from diffcraft.train.config import RunConfig
from diffcraft.train.data import make_loaders
from diffcraft.train.evaluate import evaluate
from diffcraft.train.loss import beta_at, loss_terms, total_loss, validation_loss
from diffcraft.train.provenance import reproducibility
from diffcraft.train.schedule import LRSchedule, schedule_epoch
from diffcraft.train.selection import Objective
from diffcraft.train.session import LocalSession, Session, resolve_device

__all__ = ["TrainResult", "describe_epoch", "make_autocast", "train"]

CHECK_EVERY = 50  # steps between looks at the losses (each look waits for the GPU; so does the end of an epoch)


@dataclass
class TrainResult:
    where: str  # the session's name for the run
    run_dir: Path | None = None  # its folder, for a run on this machine
    history: list[dict] = field(default_factory=list)  # one metrics dict per epoch
    best: dict = field(default_factory=dict)
    step: int = 0
    init_report: dict = field(default_factory=dict)  # module -> {'from', 'loaded', 'of'} (`init_weights`)
    scan: str = "none"  # Mamba's scan kernel in this run (`nn.scan.SCANS`), or none without a Mamba core

    def describe(self) -> str:
        return (f"{len(self.history)} epochs, {self.step} steps; best {describe_epoch(self.best)}; "
                f"{self.where}")


def describe_epoch(m: dict, epochs: int | None = None) -> str:
    """One progress line: the metrics a person reads first."""
    parts = [f"epoch {m.get(names.EPOCH, -1) + 1}" + (f"/{epochs}" if epochs else "")]
    mss = names.summary(names.MSS, names.VAL)
    if mss[0] in m:
        parts.append("val_mss {:.4f} ± {:.4f} (sd {:.4f})".format(*(m[key] for key in mss)))
    if names.VAL + names.RPA in m:
        pitch = [m[names.VAL + key] for key in (names.RPA, names.RCA, names.LOUDNESS_MAE_DB)]
        parts.append("rpa {:.3f} rca {:.3f} loud_mae {:.2f} dB".format(*pitch))
    if names.VAL + names.KL in m:
        parts.append(f"kl {m[names.VAL + names.KL]:.3f} beta {m.get(names.BETA, 0):.2g}")
    if names.VAL_ACTIVE_UNITS in m:
        parts.append(f"active {m[names.VAL_ACTIVE_UNITS]}/{m[names.VAL_LATENT_DIMS]}")
    if names.THROUGHPUT in m:
        parts.append(f"{m[names.THROUGHPUT]:.1f} audio-s/s")
    return "  ".join(parts)


def make_autocast(device: torch.device, precision: str) -> Callable:
    """A context factory: bf16 autocast of the networks, or a no-op for fp32."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class Run:
    """Everything one run holds while it trains."""
    cfg: RunConfig
    session: Session
    model: DiffCraft
    net: torch.nn.Module  # what the step calls: the model, or its data-parallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    select: tuple[str, str]  # (metric, min|max) that picks the best epoch
    result: TrainResult
    start_epoch: int = 0
    mss_fn: MultiScaleSpectralLoss = field(default_factory=MultiScaleSpectralLoss)

    @property
    def autocast(self):
        return make_autocast(self.session.device, self.cfg.train.precision)


def configure_device(cfg: RunConfig, device: torch.device) -> None:
    """Process-wide settings for training on `device`: CPU threads; on CUDA, TF32 (`train.tf32`)
    and cuDNN's autotuner (a run's shapes never change)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = True


def scan_in_use(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> str:
    """The Mamba scan the model runs on `device` (said once per process), or none without Mamba."""
    use_scan(cfg.train.scan)
    if not any(isinstance(m, Mamba) for m in model.modules()):
        return "none"
    return announce_scan(device)


def start(cfg: RunConfig, session: Session, select: tuple[str, str] = (names.VAL_LOSS, "min"),
          progress: bool = False) -> Run:
    """Build the run on the session's device; continue from the session's last commit when there is one."""
    device = session.device
    configure_device(cfg, device)
    torch.manual_seed(cfg.train.seed + 7919 * session.rank)  # distinct noise and dropout per rank
    model = DiffCraft(cfg.model).to(device)  # before the optimizer: its restored state follows the weights
    # on a GPU one fused kernel per step instead of a dozen multi-tensor launches (a checkpoint keeps
    # the choice: a run resumed on another device continues with the one it began with; both are exact)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True if device.type == "cuda" else None)
    schedule = LRSchedule(cfg.train, optimizer, select[1])
    train_loader, val_loader = make_loaders(cfg, session.rank, session.world, device)
    run = Run(cfg, session, model, model, optimizer, schedule, train_loader, val_loader, select,
              TrainResult(session.describe(), getattr(session, "run_dir", None)))
    run.result.scan = scan_in_use(model, cfg, device)
    session.record(scan=run.result.scan, **reproducibility(cfg.data.cache, device))
    saved = session.restore()
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved.get("lr_schedule", {}))
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{session.describe()}: the last checkpoint does not fit this run's config, so "
                                  f"it cannot be resumed ({str(err).splitlines()[0]}); use another run folder") from None
        set_rng_state(saved["rng"], device)
        run.result.history, run.result.best, run.result.step = saved["history"], saved["best"], saved["step"]
        run.result.init_report = saved.get("init_report", {})
        run.start_epoch = cfg.train.epochs if saved.get("stopped") else saved["epoch"] + 1
        if progress:
            print(f"resuming {session.where} after epoch {saved['epoch']} (step {run.result.step})")
    elif cfg.train.init_paths:
        run.result.init_report = init_weights(model, cfg.train.init_paths)
        if progress:
            print(describe_init(run.result.init_report))
    run.net = session.prepare_model(model)
    return run


def _first_nonfinite(losses: torch.Tensor, first_step: int, epoch: int) -> None:
    """FloatingPointError naming the first step whose training loss is not finite, if any."""
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise FloatingPointError(f"epoch {epoch}, step {first_step + i}: training loss is {losses[i].item()}")


def train_step(run: Run, batch: dict, beta: float) -> tuple[torch.Tensor, list[str]]:
    """One optimiser step on a batch already on the device: ([loss, *terms] as one tensor that
    stays on the device, their metric names). Nothing here waits for the GPU."""
    cfg = run.cfg
    with run.autocast():
        out = run.net(batch["audio"], batch["f0_hz"], batch["loudness_db"])
    terms = loss_terms(out, batch, run.mss_fn)
    loss = total_loss(terms, cfg, beta)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.train.grad_clip)
    run.optimizer.step()
    run.result.step += 1
    keys = [names.TRAIN_LOSS, *(names.TRAIN + (names.KL if n == names.KL_PER_DIM else n) for n in terms)]
    return torch.stack([loss.detach().float(), *(v.detach().float().sum() for v in terms.values())]), keys


def train_epoch(run: Run, epoch: int, progress: bool = False) -> tuple[dict, int, float]:
    """One pass over this rank's shard: (summed training terms, steps, seconds). The steps' values
    stay on the device; the host reads them every CHECK_EVERY steps and at the end of the epoch."""
    cfg, device = run.cfg, run.session.device
    total_steps = cfg.train.epochs * len(run.train_loader)
    run.train_loader.sampler.set_epoch(epoch)
    run.net.train()
    started, rows, betas, first_step = time.time(), [], [], run.result.step
    bar = tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", unit="step",
               disable=not progress, leave=False)
    for batch in bar:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        run.schedule.before_step(run.result.step, epoch)
        beta = beta_at(cfg.loss, run.result.step, total_steps)
        row, keys = train_step(run, batch, beta)
        rows.append(row)
        betas.append(beta)
        if len(rows) % CHECK_EVERY == 0:
            _first_nonfinite(torch.stack(rows[-CHECK_EVERY:])[:, 0].cpu(), run.result.step - CHECK_EVERY, epoch)
        if progress and len(rows) % 10 == 0:
            bar.set_postfix(loss=f"{rows[-1][0].item():.3f}")
    if not rows:
        return {}, 0, time.time() - started
    table = torch.stack(rows).cpu()  # [steps, 1 + terms]: the epoch's values, read at once
    _first_nonfinite(table[:, 0], first_step, epoch)
    sums = dict(zip(keys, table.double().sum(0).tolist()))
    if run.model.is_vae:
        sums[names.BETA] = float(sum(betas))
    return sums, len(rows), time.time() - started


def epoch_metrics(run: Run, epoch: int, sums: dict, n_steps: int, seconds: float) -> dict:
    """Rank 0's record of an epoch: training averages, throughput and the validation metrics."""
    world, batch = run.session.world, run.train_loader.batch_size
    metrics = {names.EPOCH: epoch, names.STEP: run.result.step, names.LR: run.optimizer.param_groups[0]["lr"],
               **{k: v / max(1, n_steps) for k, v in sums.items()}, names.EPOCH_SECONDS: seconds,
               names.THROUGHPUT: world * n_steps * batch * CLIP_SAMPLES / SAMPLE_RATE / max(seconds, 1e-9),
               **evaluate(run.model, run.val_loader, run.mss_fn, run.session.device, run.autocast)}
    metrics[names.VAL_LOSS] = validation_loss(metrics, run.cfg)
    if not math.isfinite(metrics[names.VAL_LOSS]):
        raise FloatingPointError(f"epoch {epoch}: validation loss is {metrics[names.VAL_LOSS]}")
    return metrics


def commit(run: Run, epoch: int, metrics: dict | None) -> bool:
    """Hand the epoch to the session (rank 0 with its state); True when the run stops here."""
    if metrics is None:  # ranks > 0: join the commit, keep only the count
        run.result.history.append({"epoch": epoch, "step": run.result.step})
        return run.session.commit(None, {}, False)
    run.result.history.append(metrics)
    improved = Objective(*run.select).improves(metrics, run.result.best)
    if improved:
        run.result.best = dict(metrics)
    saved = {"config": asdict(run.cfg), "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "epoch": epoch, "step": run.result.step, "history": run.result.history, "best": run.result.best,
             "rng": rng_state(run.session.device), "lr_schedule": run.schedule.state_dict(),
             "init_report": run.result.init_report, "scan": run.result.scan}
    return run.session.commit(saved, metrics, improved)


def train(cfg: RunConfig, out_dir: str | Path | None = None, progress: bool = True,
          on_epoch: Callable[[dict, Path], bool | None] | None = None, session: Session | None = None,
          select: tuple[str, str] = (names.VAL_LOSS, "min")) -> TrainResult:
    """Train `cfg` in `session` (default: this machine, checkpoints in out_dir/checkpoints,
    resumed from last.pt when it exists; `on_epoch(metrics, last_path)` may return True to stop).
    Rank 0 evaluates and commits; other ranks train their shard and join each commit."""
    if session is None:
        run_dir = Path(out_dir) if out_dir else Path(cfg.out_dir) / cfg.name
        session = LocalSession(run_dir, resolve_device(cfg.train.device), on_epoch)
    run = start(cfg, session, select, progress)
    for epoch in range(run.start_epoch, cfg.train.epochs):
        sums, n_steps, seconds = train_epoch(run, epoch, progress)
        metrics = epoch_metrics(run, epoch, sums, n_steps, seconds) if session.rank == 0 else None
        if progress and metrics:
            print(describe_epoch(metrics, cfg.train.epochs))
        schedule_epoch(run, metrics)
        if commit(run, epoch, metrics):
            break
    return run.result
