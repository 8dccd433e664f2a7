"""What every Ray Train worker of a trial runs: the training loop in a `RayTrainSession`, then on
rank 0 the trial's end-of-trial artifacts (`study.artifacts`: where the cache is already staged).

The session takes the worker's device from Ray Train, wraps the model for data parallelism with
Ray Train's own `prepare_model`, resumes from `ray.train.get_checkpoint()` and commits each epoch
with `ray.train.report(metrics, checkpoint)`. Rank 0 then waits until Ray has committed that
checkpoint, and only then logs the epoch to MLflow: a worker killed at any moment leaves MLflow at
most one epoch behind its last checkpoint, never ahead, and a restart first logs what the
checkpoint holds and MLflow lacks. So every epoch is in MLflow exactly once.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from diffcraft.study.artifacts import log_artifacts_once
from diffcraft.study.checkpoints import METRICS_FILE, STATE_FILE
from diffcraft.study.faults import fault_point
from diffcraft.study.timeline import mark, mark_process_start
from diffcraft.study.tracking import TrialRun, scalar_metrics
from diffcraft.train.checkpoint import load_checkpoint, save_checkpoint
from diffcraft.train.names import COLLAPSED, EPOCH, EPOCHS_DONE, RANK_WEIGHT_SPREAD, VAL_ACTIVE_UNITS
from diffcraft.train.session import Session


class CollapseGuard:
    """A trial whose active units stay below the floor for `patience` epochs in a row collapsed.
    Derived from the history alone, so a restarted trial judges exactly as before."""

    def __init__(self, cfg):
        self.cfg = cfg

    def collapsed(self, history: list[dict]) -> bool:
        if not self.cfg.min_active_units:
            return False
        recent = [m for m in history if VAL_ACTIVE_UNITS in m][-self.cfg.patience:]
        return len(recent) == self.cfg.patience and all(
            m[VAL_ACTIVE_UNITS] < self.cfg.min_active_units for m in recent)


def tune_report(metrics: dict, study, collapsed: bool) -> dict:
    """What Tune and Train's checkpoint ranking see: the scalar metrics, the epochs done (ASHA's
    time attribute), and the objective penalised when the guard says so."""
    report = scalar_metrics(metrics)
    report[EPOCHS_DONE] = metrics[EPOCH] + 1
    report[COLLAPSED] = float(collapsed)
    if collapsed and study.collapse_guard.action == "penalize":
        metric = study.objective.metric
        report[metric] = study.objective.penalized(report[metric], study.collapse_guard.penalty)
    return report


class RayTrainSession(Session):
    """One worker of a trial's TorchTrainer (see the module docstring)."""

    def __init__(self, study, run, lease):
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        super().__init__(ray.train.torch.get_device())
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.study, self.run = study, run  # run: the trial's TrialRun on rank 0, else None
        self.lease = lease  # the study's LeaseRef: checked before rank 0 logs anything
        self.guard = CollapseGuard(study.collapse_guard)
        self.trial = context.get_experiment_name()  # the trial's id (its Train run is named after it)
        self.where = f"trial {self.trial}"
        if run is not None:  # where this attempt trains (a restarted trial may move to another node)
            run.tag(train_node=ray.get_runtime_context().get_node_id())

    def record(self, **tags: str) -> None:
        if self.run is not None:
            self.run.tag(**tags)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        model.to(self.device)
        self.model = model
        self.mark("run_ready")
        return ray.train.torch.prepare_model(model, move_to_device=False) if self.world > 1 else model

    def restore(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            saved = load_checkpoint(Path(folder) / STATE_FILE)
        history = saved["history"]
        if self.run is not None:
            self.lease.check()
            self.run.log_missing_epochs(history)
        collapsed = self.guard.collapsed(history)
        saved["stopped"] = collapsed and self.study.collapse_guard.action == "stop"
        if saved["stopped"] or saved["epoch"] + 1 >= saved["config"]["train"]["epochs"]:
            # the trial ended before its driver learnt it (a driver killed in between): say it again,
            # or Tune and the searcher would end it on the result before
            ray.train.report(tune_report(history[-1], self.study, collapsed) if self.rank == 0 else {},
                             checkpoint=None)
        return saved

    def commit(self, saved: dict | None, metrics: dict, improved: bool) -> bool:
        import ray.train

        stop = False
        if self.world > 1:  # data parallelism keeps the ranks' weights equal: the record says it did
            spread = self.weight_spread()
            metrics[RANK_WEIGHT_SPREAD] = spread
        if saved is None:
            ray.train.report({}, checkpoint=None)
        else:
            self.lease.check()  # a driver that lost the study: its workers write no checkpoint ...
            collapsed = self.guard.collapsed(saved["history"])
            report = tune_report(metrics, self.study, collapsed)
            self.mark("epoch_trained")
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(Path(folder) / STATE_FILE, saved)
                (Path(folder) / METRICS_FILE).write_text(json.dumps(report))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
            self.mark("reported")
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            self.mark("committed")
            fault_point("worker_after_commit")  # committed, not yet in MLflow: what log_missing_epochs repairs
            self.lease.check()  # ... and log no epoch
            if not self.run.is_running():
                # Tune stopped the trial on an earlier result and its run is ended: its record stays as
                # the driver closed it, and this worker, not yet told, stops
                stop = True
            else:
                self.run.log_epoch(metrics)
                if collapsed:
                    self.run.tag(collapsed="true")
                stop = collapsed and self.study.collapse_guard.action == "stop"
            self.mark("logged")
        return bool(self.share(1.0 if stop else 0.0))

    def mark(self, event: str) -> None:
        """A timeline mark (`study.timeline`), on rank 0 only."""
        if self.rank == 0:
            mark(event, self.trial)

    def weight_spread(self) -> float:
        """The largest difference between the ranks' copies of any weight (a collective)."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.model.parameters()])
        high, low = flat.clone(), flat.clone()
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        return float((high - low).max())

    def share(self, value: float) -> float:
        """Rank 0's value, on every rank (a broadcast on the backend's device)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())


def train_worker(config: dict) -> None:
    """`train_loop_per_worker` of every trial, whatever its number of workers."""
    import ray.train

    from diffcraft.model_uri import tracking_client
    from diffcraft.train.loop import train

    study, cfg = config["study"], config["cfg"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if rank == 0:
        mark_process_start("worker_process", context.get_experiment_name())
        mark("worker_main", context.get_experiment_name())
    run = TrialRun(tracking_client(config["tracking_uri"]), config["run_id"]) if rank == 0 else None
    result = train(cfg, progress=False, session=RayTrainSession(study, run, config["lease"]),
                   select=(study.objective.metric, study.objective.mode))
    if run is not None:
        config["lease"].check()  # the study is still this driver's: only then its artifacts
        if result.init_report:  # what train.init_from loaded, module by module
            run.log_dict(result.init_report, "init_report.yaml")
        if run.is_running():  # else Tune stopped the trial and its end logs them (study.outcome)
            log_artifacts_once(run, study, context.get_experiment_name())
        mark("train_end", context.get_experiment_name())
