"""Study status and reports, read from MLflow (the record of every trial)."""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlflow.tracking import MlflowClient

from diffcraft.study.state import started_state
from diffcraft.study.tracking import NOTE, metric_at, trial_runs
from diffcraft.study.schema import StudyConfig, best_of


@dataclass
class TrialRecord:
    run_id: str
    trial: str  # Tune's trial name
    status: str
    params: dict
    group: str
    seed: str
    epochs: int
    best: dict  # metric -> value at the best epoch by the objective
    final: dict  # scored at the selected checkpoint: test_* metrics, n_parameters, seconds_per_epoch
    collapsed: bool
    name: str = ""  # the MLflow run's name: what varies (core=bimamba seed=1)
    error: str = ""  # a failed trial's error
    artifact_uri: str = ""


def trial_records(study: StudyConfig) -> list[TrialRecord]:
    """Every trial's run with its values at its best epoch (by the study objective)."""
    state = started_state(study)
    client = MlflowClient(state["tracking_uri"])
    runs = trial_runs(client, state)
    objective, mode = study.objective.metric, study.objective.mode
    searched = set(study.search.space) | ({"train.seed"} if study.search.seeds > 1 else set())
    records = []
    for run in runs:
        history = client.get_metric_history(run.info.run_id, objective)
        best_step = None
        if history:
            best_step = best_of(history, key=lambda m: m.value, mode=mode).step
        best = {}
        if best_step is not None:
            for key in run.data.metrics:
                if key.startswith(("val_", "train_")):
                    value = metric_at(client, run.info.run_id, key, best_step)
                    if value is not None:
                        best[key] = value
        params = {k: v for k, v in run.data.params.items() if k.removeprefix("run.") in searched or k in searched}
        records.append(TrialRecord(run.info.run_id, run.data.tags.get("trial_name", run.info.run_name), run.info.status,
                                   params, run.data.tags.get("config_group", ""), run.data.tags.get("seed", ""),
                                   len(history), best, {k: v for k, v in run.data.metrics.items()
                                                        if k.startswith("test_") or k.startswith(COST)},
                                   run.data.tags.get("collapsed") == "true", run.info.run_name,
                                   run.data.tags.get("error", ""), run.info.artifact_uri))
    return sorted(records, key=lambda r: r.trial)


def status_lines(study: StudyConfig) -> list[str]:
    """One line per trial (failed ones with the first line of their error and where the rest is)
    and the best so far."""
    records = trial_records(study)
    state_uri = started_state(study)["tracking_uri"]
    objective = study.objective.metric
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"study {study.name}: {len(records)} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))})"]
    width = max([len(r.name) for r in records] + [10])
    for r in records:
        value = r.best.get(objective, math.nan)
        flag = "  collapsed" if r.collapsed else ""
        lines.append(f"  {r.name:{width}s}  {r.status:9s} epochs {r.epochs:3d}  {objective} {value:.4f}  "
                     f"({r.trial}){flag}")
        if r.status == "FAILED":
            lines.append(f"      error: {error_headline(r.error)[:300]}")
            lines.append(f"      full error: {_full_error(r, study, state_uri)}")
    best = best_record(study, records)
    if best:
        lines.append(f"best so far: {best.name} ({best.trial}) {objective} {best.best[objective]:.4f}")
    return lines


def error_headline(text: str) -> str:
    """The line that says what went wrong: the innermost `SomeError: message` of a traceback (Ray
    wraps a worker's error in its own), else the first line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\w*: ", line)]
    return (raised or lines or ["no error was recorded"])[-1 if raised else 0]


def best_record(study: StudyConfig, records: list[TrialRecord]) -> TrialRecord | None:
    """The trial with the best objective at its best epoch, if any has one."""
    done = [r for r in records if study.objective.metric in r.best]
    return best_of(done, key=lambda r: r.best[study.objective.metric], mode=study.objective.mode) if done else None


def _full_error(record: TrialRecord, study: StudyConfig, tracking_uri: str) -> str:
    """Where a failed trial's traceback is: its run's error.txt (a path for a local artifact
    store, else the command that fetches it), or Tune's error file in the study's storage."""
    from urllib.parse import unquote, urlparse

    client = MlflowClient(tracking_uri)
    if any(a.path == "error.txt" for a in client.list_artifacts(record.run_id)):
        uri = f"{record.artifact_uri}/error.txt"
        if uri.startswith("file:"):
            return unquote(urlparse(uri).path)
        if uri.startswith("/"):
            return uri
        return (f"MLFLOW_TRACKING_URI={tracking_uri} mlflow artifacts download -r {record.run_id} -a error.txt "
                f"(run {record.name!r}, artifact error.txt)")
    tune = study.location / "tune"
    for rel in tune.list_info():
        if rel.startswith(record.trial) and rel.endswith("/error.txt"):
            return (tune / rel).uri
    return "no traceback was logged (the trial's process died); see the Ray logs of its node"


HEADLINE = ("mss_mean", "f0_loss", "rpa", "rca", "loudness_loss", "loudness_mae_db", "kl")  # per-clip metrics
COST = ("n_parameters", "seconds_per_epoch")
LATENT = ("val_active_units", "val_kl", "val_mean_sigma", "val_shuffle_gap")  # collapse diagnostics


def _score_name(metric: str) -> str:
    """The per-clip score a summary metric is the mean of (mss_mean -> mss)."""
    from diffcraft.train.evaluate import MEAN_NAMES

    return {mean: score for score, mean in MEAN_NAMES.items()}.get(metric, metric)


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
        return "test_" if self.split == "test" else "val_"

    @cached_property
    def metrics(self) -> list[str]:
        """The headline metrics (HEADLINE names) some trial reports on the split."""
        return [m for m in HEADLINE if any(self.seed_means(group, m) for group in self.groups)]

    def seed_means(self, group: str, metric: str, prefix: str | None = None) -> list[float]:
        prefix = prefix or self.prefix
        source = (lambda r: r.final) if prefix == "test_" else (lambda r: r.best)
        return [source(r)[prefix + metric] for r in self.groups[group] if prefix + metric in source(r)]

    def clip_means(self, group: str, metric: str) -> dict[str, float]:
        """Each clip's score averaged over the configuration's seeds."""
        per_clip: dict[str, list[float]] = {}
        for r in self.groups[group]:
            for clip, value in self.tables.get(r.run_id, {}).get(_score_name(metric), {}).items():
                if math.isfinite(value):
                    per_clip.setdefault(clip, []).append(value)
        return {clip: sum(v) / len(v) for clip, v in per_clip.items()}

    def pooled(self, group: str, metric: str) -> tuple[float, float, float, int]:
        """Mean ± SE (SD) over every (seed, clip) score, as if they were independent clips."""
        from diffcraft.train.metrics import mean_se_sd

        values = [v for r in self.groups[group] for v in self.tables.get(r.run_id, {}).get(_score_name(metric), {}).values()
                  if math.isfinite(v)]
        return (*mean_se_sd(values), len(values))


def compare(study: StudyConfig, records: list[TrialRecord]) -> Comparison:
    client = MlflowClient(started_state(study)["tracking_uri"])
    split = "test" if records and all(any(k.startswith("test_") for k in r.final) for r in records) else "validation"
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
            row[f"val_{m}"], row[f"val_{m}_se_seeds"], _ = mean_of_means(c.seed_means(group, m, "val_"))
        objective = [r.best[study.objective.metric] for r in members if study.objective.metric in r.best]
        row["objective"] = sum(objective) / len(objective) if objective else math.nan
        rows.append(row)
    rows.sort(key=lambda row: (math.isnan(row["objective"]),
                               -row["objective"] if study.objective.mode == "max" else row["objective"]))
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
        cost = [f"{row['n_parameters']:,.0f}" if not math.isnan(row["n_parameters"]) else "-",
                f"{row['seconds_per_epoch']:.1f}" if not math.isnan(row["seconds_per_epoch"]) else "-"]
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
            dims = next((f" / {r.best['val_latent_dims']:.0f}" for r in trials if "val_latent_dims" in r.best), "")
            cells = [_cell(*mean_of_means([r.best[key] for r in trials if key in r.best])[:2])
                     + (dims if key == "val_active_units" else "") for key in present]
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
    state = started_state(study)
    records = [r for r in (trial_records(study) if records is None else records) if r.best]
    best = best_record(study, records)
    lead = (f"**Best trial: `{best.name}`** ({best.trial}): {study.objective.metric} = "
            f"{best.best[study.objective.metric]:.4f} ({study.objective.mode}), run `{best.run_id}`."
            if best else "No trial has results yet.")
    text = f"{study.description}\n\n{lead}\n\n{report_markdown(study, records, False, comparison)}".lstrip()
    MlflowClient(state["tracking_uri"]).set_tag(state["parent_run_id"], NOTE, text)
    return text


def write_report(study: StudyConfig, out_dir: Path | None = None) -> Path:
    """The report (`report_rows`) as markdown and CSV, logged to the study's parent run and set as
    its description."""
    state = started_state(study)
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
    client = MlflowClient(state["tracking_uri"])
    for path in (md_path, csv_path):
        client.log_artifact(state["parent_run_id"], str(path), "report")
    for figure in _optuna_figures(study, out_dir):
        client.log_artifact(state["parent_run_id"], str(figure), "report")
    describe_study_run(study, records, comparison)
    return md_path


def _report_dir(study: StudyConfig) -> Path:
    """storage/name/report for a local study; for a study in an object store, ./<name>-report here
    (the files are also logged to the study's MLflow parent run)."""
    local = study.location.local_path()
    return local / "report" if local is not None else Path.cwd() / f"{study.name}-report"


def _optuna_figures(study: StudyConfig, out_dir: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances, where the study searched with it."""
    from diffcraft.study.runner import optuna_storage

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
