"""Study status and reports, read from MLflow (the record of every trial)."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from diffcraft.study.state import started_state
from diffcraft.study.tracking import metric_at, trial_runs
from diffcraft.study.schema import StudyConfig, best_of


@dataclass
class TrialRecord:
    run_id: str
    trial: str
    status: str
    params: dict
    group: str
    seed: str
    epochs: int
    best: dict  # metric -> value at the best epoch by the objective
    collapsed: bool


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
                                   len(history), best, run.data.tags.get("collapsed") == "true"))
    return sorted(records, key=lambda r: r.trial)


def status_lines(study: StudyConfig) -> list[str]:
    records = trial_records(study)
    objective = study.objective.metric
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"study {study.name}: {len(records)} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))})"]
    for r in records:
        value = r.best.get(objective, math.nan)
        flag = "  collapsed" if r.collapsed else ""
        lines.append(f"  {r.trial:40s} {r.status:9s} epochs {r.epochs:3d}  {objective} {value:.4f}  "
                     f"{', '.join(f'{k}={v}' for k, v in sorted(r.params.items()))}{flag}")
    done = [r for r in records if objective in r.best]
    if done:
        best = best_of(done, key=lambda r: r.best[objective], mode=study.objective.mode)
        lines.append(f"best so far: {best.trial} {objective} {best.best[objective]:.4f}")
    return lines


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


def write_report(study: StudyConfig, out_dir: Path | None = None) -> Path:
    """A table like the paper's: per configuration, each metric as mean ± SE (SD) over validation
    clips and seeds; markdown and CSV, logged to the study's parent run."""
    state = started_state(study)
    records = [r for r in trial_records(study) if r.best]
    out_dir = Path(out_dir) if out_dir else _report_dir(study)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    csv_path = out_dir / f"{study.name}_report.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["configuration"])
        writer.writeheader()
        writer.writerows(rows)
    md = [f"# Study {study.name}", "", f"Objective: {study.objective.metric} ({study.objective.mode}); "
          f"{len(records)} trials with results. Values: mean ± standard error (standard deviation) over "
          "validation clips and seeds.", "",
          "| configuration | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for row in rows:
        cells = [f"{row[m]:.4f} ± {row[m + '_se']:.4f} ({row[m + '_sd']:.4f})" if not math.isnan(row[m]) else "-"
                 for m in metrics]
        md.append(f"| {row['configuration']} | {row['seeds']} | " + " | ".join(cells) + " |")
    md_path = out_dir / f"{study.name}_report.md"
    md_path.write_text("\n".join(md) + "\n")
    client = MlflowClient(state["tracking_uri"])
    for path in (md_path, csv_path):
        client.log_artifact(state["parent_run_id"], str(path), "report")
    for figure in _optuna_figures(study, out_dir):
        client.log_artifact(state["parent_run_id"], str(figure), "report")
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
