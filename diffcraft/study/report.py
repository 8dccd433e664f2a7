"""Study status and reports, read from MLflow (the record of every trial)."""
from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
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
                                   len(history), best, run.data.tags.get("collapsed") == "true", run.info.run_name,
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


def _pooled(records: list[TrialRecord], metric: str) -> tuple[float, float, float, int]:
    """Mean, standard error and SD over validation clips and seeds. For MSS the per-trial clip
    statistics are pooled exactly (from each trial's mean, SD and clip count); other metrics are
    taken over seeds."""
    if metric == "val_mss_mean":
        parts = [(r.best["val_mss_mean"], r.best.get("val_mss_sd", 0.0), int(r.best.get("val_n_clips", 1)))
                 for r in records if "val_mss_mean" in r.best]
    else:
        parts = [(r.best[metric], 0.0, 1) for r in records if metric in r.best]
    n = sum(p[2] for p in parts)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = sum(m * k for m, _, k in parts) / n
    if n < 2:
        return mean, 0.0, 0.0, n
    var = (sum((k - 1) * s ** 2 for _, s, k in parts) + sum(k * (m - mean) ** 2 for m, _, k in parts)) / (n - 1)
    sd = math.sqrt(max(var, 0.0))
    return mean, sd / math.sqrt(n), sd, n


REPORT_METRICS = ("val_mss_mean", "val_rpa", "val_rca", "val_loudness_mae_db", "val_f0_loss", "val_kl",
                  "val_active_units")


def report_rows(study: StudyConfig, records: list[TrialRecord]) -> tuple[list[dict], list[str]]:
    """(one row per configuration, best first; the metrics its columns show)."""
    groups: dict[str, list[TrialRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    metrics = [m for m in REPORT_METRICS if any(m in r.best for r in records)]
    rows = []
    for group, members in groups.items():
        params = {k: v for k, v in members[0].params.items() if k != "train.seed"}
        row = {"configuration": ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "base",
               "seeds": len(members)}
        for m in metrics:
            mean, se, sd, n = _pooled(members, m)
            row.update({f"{m}": mean, f"{m}_se": se, f"{m}_sd": sd, f"{m}_n": n})
        rows.append(row)
    key = study.objective.metric if study.objective.metric in metrics else (metrics[0] if metrics else None)
    if key:
        rows.sort(key=lambda row: row[key], reverse=study.objective.mode == "max")
    return rows, metrics


def report_markdown(study: StudyConfig, records: list[TrialRecord], title: bool = True) -> str:
    """The report table in markdown (records: the trials with results)."""
    rows, metrics = report_rows(study, records)
    md = ([f"# Study {study.name}", ""] if title else []) + [
        f"Objective: {study.objective.metric} ({study.objective.mode}); {len(records)} trials with results. "
        "Values: mean ± standard error (standard deviation) over validation clips and seeds.", "",
        "| configuration | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in rows:
        cells = [f"{row[m]:.4f} ± {row[m + '_se']:.4f} ({row[m + '_sd']:.4f})" if not math.isnan(row[m]) else "-"
                 for m in metrics]
        md.append(f"| {row['configuration']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def describe_study_run(study: StudyConfig, records: list[TrialRecord] | None = None) -> str:
    """Set the parent run's description (what the MLflow UI shows on its page): the best trial
    and the report table. Returns the markdown."""
    state = started_state(study)
    records = [r for r in (trial_records(study) if records is None else records) if r.best]
    best = best_record(study, records)
    lead = (f"**Best trial: `{best.name}`** ({best.trial}): {study.objective.metric} = "
            f"{best.best[study.objective.metric]:.4f} ({study.objective.mode}), run `{best.run_id}`."
            if best else "No trial has results yet.")
    text = f"{study.description}\n\n{lead}\n\n{report_markdown(study, records, title=False)}".lstrip()
    MlflowClient(state["tracking_uri"]).set_tag(state["parent_run_id"], NOTE, text)
    return text


def write_report(study: StudyConfig, out_dir: Path | None = None) -> Path:
    """A table like the paper's: per configuration, each metric as mean ± SE (SD) over validation
    clips and seeds; markdown and CSV, logged to the study's parent run and set as its description."""
    state = started_state(study)
    records = [r for r in trial_records(study) if r.best]
    out_dir = Path(out_dir) if out_dir else _report_dir(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, _ = report_rows(study, records)
    csv_path = out_dir / f"{study.name}_report.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["configuration"])
        writer.writeheader()
        writer.writerows(rows)
    md_path = out_dir / f"{study.name}_report.md"
    md_path.write_text(report_markdown(study, records))
    client = MlflowClient(state["tracking_uri"])
    for path in (md_path, csv_path):
        client.log_artifact(state["parent_run_id"], str(path), "report")
    for figure in _optuna_figures(study, out_dir):
        client.log_artifact(state["parent_run_id"], str(figure), "report")
    describe_study_run(study, records)
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
