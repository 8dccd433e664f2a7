"""One Ray Tune trial: a Tune function trainable that opens the trial's MLflow run and trains it
as a Ray Train `TorchTrainer` of `resources.workers` workers (`study.worker.train_worker`).
Its rank-0 worker logs what the trial produced after its last epoch (`study.artifacts`); when the
trial ends, `study.outcome` ends its run.

The Train run is named after the trial and lives in the study's storage (`<study>/train/<trial>`),
so a trial restarted on any node, or by a resumed study, continues from its last committed epoch.
Retries happen at one level only, Tune's (`max_retries`): Ray Train itself does not retry a failed
worker, so a failure costs one retry, not one per level. It only tries again to start workers that
found no nodes in `resources.worker_start_timeout_s` (up to `resources.controller_failure_limit`
times): an autoscaling cluster starts GPU nodes meanwhile.
"""
from __future__ import annotations

import os
import traceback
from dataclasses import asdict

from diffcraft.storage import filesystem
from diffcraft.study.checkpoints import train_location
from diffcraft.study.config import StudyConfig
from diffcraft.study.lease import LeaseRef
from diffcraft.study.record import StudyRecord
from diffcraft.study.space import config_hash, trial_label
from diffcraft.study.timeline import mark, mark_memory
from diffcraft.study.tracking import TrialRun, code_version
from diffcraft.study.worker import train_worker

# what a trial's own process reserves (its workers hold the CPUs and GPUs): it holds torch, Ray Tune
# and Train and MLflow, 554 MiB resident (362 MiB its own) at its end (benchmarks/study_overhead.py --profile)
TRIAL_DRIVER_MEMORY = 600 << 20


def trial_main(params: dict, study: StudyConfig, record: StudyRecord, lease: LeaseRef) -> None:
    """The Tune function trainable (see the module docstring)."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    ctx = tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    mark("trial_main", trial_id)
    cfg = study.trial_config(params)
    cfg.name = trial_id
    lease.check()  # a driver that lost the study starts nothing more
    tags = {"study": study.name, "trial_name": trial_name, "seed": cfg.train.seed,
            "config_hash": config_hash(params), "config_group": config_hash(params, without_seed=True),
            "code_version": code_version(), "workers": study.resources.workers}
    run = TrialRun.open(record.tracking_uri, record.experiment_id, record.parent_run_id, trial_id, tags,
                        asdict(cfg), run_name=trial_label(params))  # named by what varies; Tune's name is a tag
    mark("run_opened", trial_id)
    fs, root = filesystem(train_location(study).uri)
    r = study.resources
    _pin_cluster_address()
    _set_worker_start_timeout(r.worker_start_timeout_s)
    mark("fit_start", trial_id)
    try:
        TorchTrainer(
            train_worker,
            train_loop_config={"study": study, "cfg": cfg, "run_id": run.run_id, "tracking_uri": record.tracking_uri,
                               "lease": lease},
            scaling_config=ray.train.ScalingConfig(
                num_workers=r.workers, use_gpu=r.gpus_per_worker > 0,
                resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}),
            run_config=ray.train.RunConfig(
                name=trial_id, storage_path=root, storage_filesystem=fs,
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=study.objective.metric,
                    checkpoint_score_order=study.objective.mode),  # the best by the objective, and the latest
                failure_config=ray.train.FailureConfig(max_failures=0,
                                                       controller_failure_limit=r.controller_failure_limit),
                callbacks=[TuneReportCallback()]),
        ).fit()
        mark_memory("fit_end", trial_id)
    except Exception as err:
        lease.check()  # a trial of a driver that lost the study writes nothing more, not even its error
        run.tag(error=f"{type(err).__name__}: {err}"[:5000])
        run.client.log_text(run.run_id, traceback.format_exc(), "error.txt")
        raise


def _pin_cluster_address() -> None:
    """Ray Train's placement-group cleaner asks the State API whether the Train controller lives;
    without an address that API looks for Ray on the machine and gives up when it finds several
    instances (two clusters, or a local Ray beside a cluster node), and the placement group of a
    trial stopped early then leaks. RAY_ADDRESS, passed on to the controller, names ours."""
    import ray
    from ray.train.v2._internal import constants

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    constants.ENV_VARS_TO_PROPAGATE.add("RAY_ADDRESS")


def _set_worker_start_timeout(seconds: float) -> None:
    """Ray Train reads how long a worker group may take to start from its controller's environment
    (60 s by default, too short for an autoscaler to start a GPU node); the trainer passes this
    process's value on to the controller."""
    from ray.train.v2._internal import constants

    os.environ[constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR] = str(seconds)
