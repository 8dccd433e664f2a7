"""Study reports, read from MLflow (the record of every trial): configurations side by side on the
test split, with the seed as the experimental unit, pooled per-clip figures beside them, paired
differences to the best configuration, latent diagnostics, and Optuna's plots."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlflow.tracking import MlflowClient

from diffcraft.study.config import StudyConfig
from diffcraft.study.record import StudyRecord
from diffcraft.study.search import optuna_storage
from diffcraft.study.status import COST, TrialRecord, best_record, trial_records
from diffcraft.study.tracking import NOTE
from diffcraft.train.names import (ACTIVE_UNITS, F0_LOSS, KL, LOUDNESS_LOSS, LOUDNESS_MAE_DB, MEAN_SIGMA, MSS,
                                   N_PARAMETERS, RCA, RPA, SECONDS_PER_EPOCH, SHUFFLE_GAP, TEST, VAL, VAL_ACTIVE_UNITS,
                                   VAL_LATENT_DIMS, mean_name, score_of)

HEADLINE = tuple(mean_name(s) for s in (MSS, F0_LOSS, RPA, RCA, LOUDNESS_LOSS, LOUDNESS_MAE_DB, KL))  # per clip
LATENT = tuple(VAL + k for k in (ACTIVE_UNITS, KL, MEAN_SIGMA, SHUFFLE_GAP))  # collapse diagnostics


def clip_table(client: MlflowClient, record: TrialRecord, split: str) -> dict[str, dict[str, float]]:
    """{score: {clip: value}} of a trial at its selected checkpoint (empty when not logged)."""
    import tempfile

    from diffcraft.train.metrics import read_clip_table

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial is noise here
    name = f"clips_{split}.csv"
    if not any(a.path == f"evaluation/{name}" for a in client.list_artifacts(record.run_id, "evaluation")):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        return read_clip_table(Path(client.download_artifacts(record.run_id, f"evaluation/{name}", tmp)).read_text())


@dataclass
class Comparison:
    """A study's results, configuration by configuration, on the split a report cites."""
    split: str  # "test", or "validation" when a trial has no test scores
    groups: dict[str, list[TrialRecord]]  # configuration name -> its trials (one per seed)
    tables: dict[str, dict[str, dict[str, float]]]  # run id -> {score: {clip: value}} on `split`

    @property
    def prefix(self) -> str:
        return TEST if self.split == "test" else VAL

    @cached_property
    def metrics(self) -> list[str]:
        """The headline metrics (HEADLINE names) some trial reports on the split."""
        return [m for m in HEADLINE if any(self.seed_means(group, m) for group in self.groups)]

    def seed_means(self, group: str, metric: str, prefix: str | None = None) -> list[float]:
        prefix = prefix or self.prefix
        source = (lambda r: r.final) if prefix == TEST else (lambda r: r.best)
        return [source(r)[prefix + metric] for r in self.groups[group] if prefix + metric in source(r)]

    def clip_means(self, group: str, metric: str) -> dict[str, float]:
        """Each clip's score averaged over the configuration's seeds."""
        per_clip: dict[str, list[float]] = {}
        for r in self.groups[group]:
            for clip, value in self.tables.get(r.run_id, {}).get(score_of(metric), {}).items():
                if math.isfinite(value):
                    per_clip.setdefault(clip, []).append(value)
        return {clip: sum(v) / len(v) for clip, v in per_clip.items()}

    def pooled(self, group: str, metric: str) -> tuple[float, float, float, int]:
        """Mean ± SE (SD) over every (seed, clip) score, as if they were independent clips."""
        from diffcraft.train.metrics import mean_se_sd

        values = [v for r in self.groups[group] for v in self.tables.get(r.run_id, {}).get(score_of(metric), {}).values()
                  if math.isfinite(v)]
        return (*mean_se_sd(values), len(values))


def compare(study: StudyConfig, records: list[TrialRecord]) -> Comparison:
    client = StudyRecord.started(study).client()
    split = "test" if records and all(any(k.startswith(TEST) for k in r.final) for r in records) else "validation"
    groups: dict[str, list[TrialRecord]] = {}
    for r in records:
        params = {k: v for k, v in r.params.items() if k != "train.seed"}
        groups.setdefault(", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "base", []).append(r)
    return Comparison(split, groups, {r.run_id: clip_table(client, r, split) for r in records})


def report_rows(study: StudyConfig, comparison: Comparison) -> list[dict]:
    """One row per configuration, best first by the objective: cost, the headline metrics over
    seeds (mean of seed means ± SE over seeds) and pooled over clips, validation beside, and the
    paired difference to the best configuration on the same clips."""
    from diffcraft.train.metrics import mean_of_means, paired_difference

    c, rows = comparison, []
    for group, members in c.groups.items():
        row: dict = {"configuration": group, "seeds": len(members)}
        for key in COST:
            values = [r.final[key] for r in members if key in r.final]
            row[key] = sum(values) / len(values) if values else math.nan
        for m in c.metrics:
            row[m], row[f"{m}_se_seeds"], _ = mean_of_means(c.seed_means(group, m))
            row[f"{m}_pooled"], row[f"{m}_pooled_se"], row[f"{m}_pooled_sd"], row[f"{m}_pooled_n"] = c.pooled(group, m)
            row[f"val_{m}"], row[f"val_{m}_se_seeds"], _ = mean_of_means(c.seed_means(group, m, VAL))
        objective = [r.best[study.objective.metric] for r in members if study.objective.metric in r.best]
        row["objective"] = sum(objective) / len(objective) if objective else math.nan
        rows.append(row)
    rows.sort(key=lambda row: (math.isnan(row["objective"]), study.objective.rank(row["objective"])))
    if rows:
        best = rows[0]["configuration"]
        for row in rows:
            for m in c.metrics:
                diff, se, n = paired_difference(c.clip_means(row["configuration"], m), c.clip_means(best, m))
                row.update({f"{m}_diff": diff, f"{m}_diff_se": se, f"{m}_diff_n": n})
    return rows


def _cell(mean: float, se: float, sd: float | None = None) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{mean:.4f}" + (f" ± {se:.4f}" if not math.isnan(se) else "")
    return text + (f" ({sd:.4f})" if sd is not None and not math.isnan(sd) else "")


def report_markdown(study: StudyConfig, records: list[TrialRecord], title: bool = True,
                    comparison: Comparison | None = None) -> str:
    """The report in markdown (records: the trials with results, `comparison` theirs when the
    caller has it: it downloads every trial's clip scores); see `report_rows`."""
    c = comparison or compare(study, records)
    rows = report_rows(study, c)
    split_note = ("the test split, at the epoch each trial chose on the validation split" if c.split == "test" else
                  "the validation split, which also chose each trial's best epoch: optimistic (the cache has no "
                  "test split; prepare it with --test-fraction or --split-file)")
    head = lambda cols: ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # noqa: E731
    md = ([f"# Study {study.name}", ""] if title else []) + [
        f"Objective: {study.objective.metric} ({study.objective.mode}); {len(records)} trials with results. "
        f"Numbers from {split_note}.", "", "## Configurations", "",
        "Mean over seeds of each trial's mean over clips ± standard error over seeds (none with one seed); "
        "parameters and training seconds per epoch.", ""]
    md += head(["seeds", "parameters", "s/epoch", *(c.prefix + m for m in c.metrics)])
    for row in rows:
        cost = [f"{row[N_PARAMETERS]:,.0f}" if not math.isnan(row[N_PARAMETERS]) else "-",
                f"{row[SECONDS_PER_EPOCH]:.1f}" if not math.isnan(row[SECONDS_PER_EPOCH]) else "-"]
        md.append(f"| {row['configuration']} | {row['seeds']} | " + " | ".join(
            cost + [_cell(row[m], row[f"{m}_se_seeds"]) for m in c.metrics]) + " |")
    md += ["", "## Pooled over clips and seeds", "",
           "Mean ± standard error (standard deviation) over every (seed, clip) score, n scores: the paper's form, "
           "which treats seeds x clips as independent clips.", ""]
    md += head([c.prefix + m for m in c.metrics])
    for row in rows:
        md.append(f"| {row['configuration']} | " + " | ".join(
            _cell(row[f"{m}_pooled"], row[f"{m}_pooled_se"], row[f"{m}_pooled_sd"]) + f", n {row[f'{m}_pooled_n']}"
            for m in c.metrics) + " |")
    if c.split == "test":
        md += ["", "## Validation (the split that chose each trial's epoch)", ""]
        md += head([f"val_{m}" for m in c.metrics])
        for row in rows:
            md.append(f"| {row['configuration']} | " + " | ".join(
                _cell(row[f"val_{m}"], row[f"val_{m}_se_seeds"]) for m in c.metrics) + " |")
    present = [k for k in LATENT if any(k in r.best for r in records)]
    if present:
        from diffcraft.train.metrics import mean_of_means

        md += ["", "## Latent diagnostics (validation, at the selected epoch)", "",
               "Mean over seeds ± standard error over seeds: active units (of the latent dimensions), KL in nats "
               "per frame, mean posterior sigma, and the z-shuffle gap (near 0: the decoders ignore z).", ""]
        md += head(present)
        for row in rows:
            trials = c.groups[row["configuration"]]
            dims = next((f" / {r.best[VAL_LATENT_DIMS]:.0f}" for r in trials if VAL_LATENT_DIMS in r.best), "")
            cells = [_cell(*mean_of_means([r.best[key] for r in trials if key in r.best])[:2])
                     + (dims if key == VAL_ACTIVE_UNITS else "") for key in present]
            md.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        md += ["", f"## Paired differences to the best configuration ({rows[0]['configuration']})", "",
               f"Per {c.split} clip, each configuration's score averaged over its seeds, minus the best's on the same "
               "clip: mean paired difference ± its standard error (n clips).", ""]
        md += head([c.prefix + m for m in c.metrics])
        for row in rows[1:]:
            md.append(f"| {row['configuration']} | " + " | ".join(
                (f"{row[f'{m}_diff']:+.4f} ± {row[f'{m}_diff_se']:.4f} (n {row[f'{m}_diff_n']})"
                 if row[f"{m}_diff_n"] else "-") for m in c.metrics) + " |")
    return "\n".join(md) + "\n"


def describe_study_run(study: StudyConfig, records: list[TrialRecord] | None = None,
                       comparison: Comparison | None = None) -> str:
    """Set the parent run's description (what the MLflow UI shows on its page): the best trial
    and the report table. Returns the markdown."""
    record = StudyRecord.started(study)
    records = [r for r in (trial_records(study) if records is None else records) if r.best]
    best = best_record(study, records)
    lead = (f"**Best trial: `{best.name}`** ({best.trial}): {study.objective.metric} = "
            f"{best.best[study.objective.metric]:.4f} ({study.objective.mode}), run `{best.run_id}`."
            if best else "No trial has results yet.")
    text = f"{study.description}\n\n{lead}\n\n{report_markdown(study, records, False, comparison)}".lstrip()
    record.client().set_tag(record.parent_run_id, NOTE, text)
    return text


def write_report(study: StudyConfig, out_dir: Path | None = None) -> Path:
    """The report (`report_rows`) as markdown and CSV, logged to the study's parent run and set as
    its description."""
    record = StudyRecord.started(study)
    records = [r for r in trial_records(study) if r.best]
    out_dir = Path(out_dir) if out_dir else _report_dir(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(study, records)
    rows = report_rows(study, comparison)
    csv_path = out_dir / f"{study.name}_report.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["configuration"])
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / f"{study.name}_report.md"
    md_path.write_text(report_markdown(study, records, comparison=comparison))
    client = record.client()
    for path in (md_path, csv_path):
        client.log_artifact(record.parent_run_id, str(path), "report")
    for figure in _optuna_figures(study, out_dir):
        client.log_artifact(record.parent_run_id, str(figure), "report")
    describe_study_run(study, records, comparison)
    return md_path


def _report_dir(study: StudyConfig) -> Path:
    """storage/name/report for a local study; for a study in an object store, ./<name>-report here
    (the files are also logged to the study's MLflow parent run)."""
    local = study.location.local_path()
    return local / "report" if local is not None else Path.cwd() / f"{study.name}-report"


def _optuna_figures(study: StudyConfig, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, where the study searched with it."""
    if study.search.algorithm != "optuna" or (storage := optuna_storage(study)) is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opt = optuna.load_study(study_name=study.name, storage=storage)
    paths = []
    complete = [t for t in opt.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for name, plot, needed in (("history", ovm.plot_optimization_history, 1),
                               ("importance", ovm.plot_param_importances, 2)):
        if len(complete) < needed or (name == "importance" and len(study.search.space) < 1):
            continue
        try:
            ax = plot(opt)
        except (ValueError, RuntimeError):
            continue  # e.g. importances need at least two distinct values
        path = out_dir / f"{study.name}_optuna_{name}.png"
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(path)
    return paths
