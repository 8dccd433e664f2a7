"""The names of the metrics a run and a trial report, declared once. The loss terms and the loop
produce them under these names, `train.stages` builds from them what each stage reports each
epoch, and the progress line, the study's checks, Tune's reports, the report and promotion read
them from here. (`train.evaluate` keys its per-clip scores by the score names below; a test of
every stage holds what an epoch reports to `train.stages`.)
"""
from __future__ import annotations

TRAIN, VAL, TEST = "train_", "val_", "test_"  # prefixes: training averages, validation split, test split

# per-clip scores (`train.evaluate`), each reported over a split as its mean, `_se` and `_sd`
MSS, F0_LOSS, LOUDNESS_LOSS, KL = "mss", "f0_loss", "loudness_loss", "kl"
RPA, RCA, LOUDNESS_MAE_DB, SHUFFLE_GAP = "rpa", "rca", "loudness_mae_db", "shuffle_gap"
MEAN_NAMES = {MSS: "mss_mean"}  # where a mean's metric name is not the score's own
N_CLIPS = "n_clips"  # clips scored on the split
HEADLINE = (MSS, F0_LOSS, RPA, RCA, LOUDNESS_LOSS, LOUDNESS_MAE_DB, KL)  # the scores a study report compares

# one epoch's record (`train.loop.epoch_metrics`)
EPOCH, STEP, LR, BETA = "epoch", "step", "lr", "beta"
EPOCH_SECONDS, THROUGHPUT = "epoch_seconds", "audio_seconds_per_second"
LOSS = "loss"  # the weighted loss: train_loss, val_loss
KL_PER_DIM = "kl_per_dim"  # the KL loss term per latent dimension; as a training average: train_kl
RANK_WEIGHT_SPREAD = "rank_weight_spread"  # data parallelism: the ranks' largest weight difference

# latent diagnostics of the validation set as a whole (`val_` prefixed)
ACTIVE_UNITS, LATENT_DIMS, LATENT_VARIANCE, MEAN_SIGMA = "active_units", "latent_dims", "latent_variance", "mean_sigma"
PER_DIMENSION = (VAL + LATENT_VARIANCE, VAL + KL_PER_DIM)  # lists, one value per latent dimension
HEAD_DIAGNOSTICS = (ACTIVE_UNITS, KL, SHUFFLE_GAP)  # also per latent head (`per_head`): which head collapsed

# a trial's, beside its epochs: Tune's time attribute and guard flag, and the cost of its configuration
EPOCHS_DONE, COLLAPSED = "epochs_done", "collapsed"
N_PARAMETERS, SECONDS_PER_EPOCH = "n_parameters", "seconds_per_epoch"  # and n_parameters_<module>

TRAIN_LOSS, VAL_LOSS = TRAIN + LOSS, VAL + LOSS
VAL_ACTIVE_UNITS, VAL_LATENT_DIMS = VAL + ACTIVE_UNITS, VAL + LATENT_DIMS


def mean_name(score: str, prefix: str = "") -> str:
    """The metric holding a score's mean over clips: ('mss', 'val_') -> 'val_mss_mean'."""
    return prefix + MEAN_NAMES.get(score, score)


def headline_names() -> tuple[str, ...]:
    """The metrics (without prefix) a study report compares: the means of the HEADLINE scores."""
    return tuple(mean_name(score) for score in HEADLINE)


def per_head(diagnostic: str, head: str) -> str:
    """A latent diagnostic of one head ('val_active_units', 'loudness' -> 'val_active_units_loudness')."""
    return f"{diagnostic}_{head}"


def score_of(mean: str) -> str:
    """The per-clip score a mean's metric (without prefix) summarises: 'mss_mean' -> 'mss'."""
    return {name: score for score, name in MEAN_NAMES.items()}.get(mean, mean)


def summary(score: str, prefix: str = "") -> tuple[str, str, str]:
    """The metrics of a score's mean, standard error and standard deviation over clips."""
    return mean_name(score, prefix), f"{prefix}{score}_se", f"{prefix}{score}_sd"


def summary_names(scores, prefix: str) -> set[str]:
    """What `train.evaluate.summarize` reports for these per-clip scores (`summary` of each)."""
    return {name for score in scores for name in summary(score, prefix)}
