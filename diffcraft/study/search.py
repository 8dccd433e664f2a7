"""How Tune searches a study: the search algorithm (grid and random variants, or Optuna's TPE with
its storage), the trial scheduler (FIFO, or ASHA on the objective), and the Optuna bookkeeping a
study that ended needs."""
from __future__ import annotations

from diffcraft.envref import resolve
from diffcraft.study.config import StudyConfig
from diffcraft.train.names import EPOCHS_DONE


def optuna_storage(study: StudyConfig):
    """Optuna's storage: the configured RDB URL; else a SQLite file in a local storage folder; else
    none (the sampler's history then travels in Tune's experiment state in the object store)."""
    import optuna

    if study.optuna.storage:
        return optuna.storages.RDBStorage(resolve(study.optuna.storage, "optuna.storage"))
    local = study.location.local_path()
    if local is None:
        return None
    local.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{local / 'optuna.db'}")


def search_algorithm(study: StudyConfig):
    """Optuna's TPE, or for grid and random a generator of variants whose sampled values are
    kept over the seeds' grid. Tune applies max_concurrent_trials to Searchers only, so the
    generator is given the concurrency itself."""
    if study.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=study.objective.metric, mode=study.objective.mode, study_name=study.name,
                            storage=optuna_storage(study), seed=study.run.train.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(constant_grid_search=True, max_concurrent=study.concurrency)


def scheduler(study: StudyConfig):
    """FIFO, or ASHA compared on epochs done, so a restarted trial is judged on the right budget. A
    trial that reaches its last epoch is not stopped: it ends by itself, its rank-0 worker logging
    its artifacts first (`study.artifacts`), which a stop would cut short."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if study.scheduler.kind != "asha":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=EPOCHS_DONE, max_t=study.run.train.epochs,
                         grace_period=study.scheduler.grace_epochs, reduction_factor=study.scheduler.reduction_factor,
                         stop_last_trials=False)


def fail_orphan_suggestions(study: StudyConfig) -> list[int]:
    """Optuna trials left RUNNING once the whole study has ended: suggestions whose driver died
    before Tune's snapshot recorded them (Tune suggested them again after the resume). Marked
    FAIL, so the sampler's history holds no trial that never ends. Returns their numbers."""
    if study.search.algorithm != "optuna" or (storage := optuna_storage(study)) is None:
        return []
    import optuna

    try:
        opt = optuna.load_study(study_name=study.name, storage=storage)
    except KeyError:  # no trial was ever suggested
        return []
    stale = [t.number for t in opt.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    for number in stale:
        opt.tell(number, state=optuna.trial.TrialState.FAIL)
    return stale
