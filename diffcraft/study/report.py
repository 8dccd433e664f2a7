"""Study reports, read from MLflow (the record of every trial): configurations side by side on the
test split with the seed as the experimental unit (mean over seeds, t interval, seed SD), each
compared to a baseline by a mixed model with Holm-corrected p-values, effect sizes and equivalence
tests (`study.stats`), per-song results, latent diagnostics, and Optuna's plots."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlflow.tracking import MlflowClient

from diffcraft.errors import StudyConfigError
from diffcraft.models.encoders import LATENT_HEADS
from diffcraft.study.config import StudyConfig
from diffcraft.study.curves import learning_curves
from diffcraft.study.record import StudyRecord
from diffcraft.study.search import optuna_storage
from diffcraft.study.space import SEED
from diffcraft.study.stats import (LEVEL, METHODS, ClipScore, SeedInterval, compare_to, factorial_effects,
                                   seed_interval)
from diffcraft.study.status import COST, TrialRecord, best_record, trial_records
from diffcraft.study.tracking import NOTE
from diffcraft.train.names import (ACTIVE_UNITS, HEAD_DIAGNOSTICS, KL, MEAN_SIGMA, N_PARAMETERS, SECONDS_PER_EPOCH,
                                   SHUFFLE_GAP, TEST, VAL, VAL_ACTIVE_UNITS, VAL_LATENT_DIMS, headline_names, per_head,
                                   score_of)
from diffcraft.train.provenance import RECORD

HEADLINE = headline_names()  # per clip
HEADS = sorted({head for heads in LATENT_HEADS.values() for head in heads})
LATENT = (tuple(VAL + k for k in (ACTIVE_UNITS, KL, MEAN_SIGMA, SHUFFLE_GAP))  # collapse diagnostics, then per head
          + tuple(VAL + per_head(k, head) for k in HEAD_DIAGNOSTICS for head in HEADS))
WHOLE_TRIAL = "(trial mean)"  # the clip name of a trial's mean when it logged no per-clip scores


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
        """Each trial's mean over the split's clips: one value per seed."""
        prefix = prefix or self.prefix
        source = (lambda r: r.final) if prefix == TEST else (lambda r: r.best)
        return [source(r)[prefix + metric] for r in self.groups[group] if prefix + metric in source(r)]

    def clip_scores(self, metric: str) -> list[ClipScore]:
        """Every trial's per-clip scores on the split (a trial without them: its mean, as one score)."""
        out = []
        for group, members in self.groups.items():
            for r in members:
                clips = self.tables.get(r.run_id, {}).get(score_of(metric), {})
                if clips:
                    out += [ClipScore(group, r.run_id, clip, v) for clip, v in clips.items() if math.isfinite(v)]
                else:
                    source = r.final if self.prefix == TEST else r.best
                    if self.prefix + metric in source:
                        out.append(ClipScore(group, r.run_id, WHOLE_TRIAL, source[self.prefix + metric]))
        return out

    def song_intervals(self, group: str, metric: str) -> dict[str, SeedInterval]:
        """Per song: each trial's mean over the song's clips, summarised over seeds."""
        per_song: dict[str, dict[str, list[float]]] = {}
        for s in self.clip_scores(metric):
            if s.config == group and s.clip != WHOLE_TRIAL:
                per_song.setdefault(s.song, {}).setdefault(s.trial, []).append(s.value)
        return {song: seed_interval([sum(v) / len(v) for v in trials.values()])
                for song, trials in sorted(per_song.items())}


def compare(study: StudyConfig, records: list[TrialRecord]) -> Comparison:
    client = StudyRecord.started(study).client()
    split = "test" if records and all(any(k.startswith(TEST) for k in r.final) for r in records) else "validation"
    groups: dict[str, list[TrialRecord]] = {}
    for r in records:
        params = {k: v for k, v in r.params.items() if k != "train.seed"}
        groups.setdefault(", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "base", []).append(r)
    return Comparison(split, groups, {r.run_id: clip_table(client, r, split) for r in records})


def baseline_of(study: StudyConfig, ranked: list[str]) -> str:
    """The configuration the others are compared to: `report.baseline`, else the best (first)."""
    wanted = study.report.baseline.strip()
    if not wanted:
        return ranked[0]
    parts = sorted(p.strip() for p in wanted.split(","))
    for name in ranked:
        if sorted(p.strip() for p in name.split(",")) == parts:
            return name
    raise StudyConfigError(f"report.baseline: {wanted!r} is not a configuration of study {study.name} "
                           f"({'; '.join(ranked)})")


def _put(row: dict, key: str, interval: SeedInterval) -> None:
    row[key], row[f"{key}_low"], row[f"{key}_high"], row[f"{key}_seed_sd"] = (
        interval.mean, interval.low, interval.high, interval.sd)


def report_rows(study: StudyConfig, comparison: Comparison) -> list[dict]:
    """One row per configuration, best first by the objective: cost, each headline metric's mean
    over seeds with its t interval and seed SD (validation beside), and its difference to the
    baseline (`stats.Difference` fields as `{metric}_diff...`)."""
    c, rows = comparison, []
    for group, members in c.groups.items():
        row: dict = {"configuration": group, "seeds": len(members)}
        for key in COST:
            values = [r.final[key] for r in members if key in r.final]
            row[key] = sum(values) / len(values) if values else math.nan
        for m in c.metrics:
            _put(row, m, seed_interval(c.seed_means(group, m)))
            _put(row, f"val_{m}", seed_interval(c.seed_means(group, m, VAL)))
        objective = [r.best[study.objective.metric] for r in members if study.objective.metric in r.best]
        row["objective"] = sum(objective) / len(objective) if objective else math.nan
        rows.append(row)
    rows.sort(key=lambda row: (math.isnan(row["objective"]), study.objective.rank(row["objective"])))
    if len(rows) > 1:
        baseline = baseline_of(study, [row["configuration"] for row in rows])
        for m in c.metrics:
            means = {group: c.seed_means(group, m) for group in c.groups}
            margin = study.report.equivalence.get(m, math.nan)
            for group, d in compare_to(baseline, c.clip_scores(m), means, margin).items():
                row = next(r for r in rows if r["configuration"] == group)
                row.update({f"{m}_diff": d.estimate, f"{m}_diff_low": d.low, f"{m}_diff_high": d.high,
                            f"{m}_diff_se": d.se, f"{m}_diff_df": d.df, f"{m}_p": d.p, f"{m}_p_holm": d.p_holm,
                            f"{m}_effect": d.effect, f"{m}_margin": d.margin, f"{m}_tost_p": d.tost_p,
                            f"{m}_tost_p_holm": d.tost_p_holm, f"{m}_method": d.method})
        for row in rows:
            row["baseline"] = baseline
    return rows


def _num(value: float, digits: int = 4) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _interval_cell(row: dict, key: str) -> str:
    """'mean [low, high] (sd)' of a SeedInterval put by `_put`; '-' when absent."""
    if key not in row or math.isnan(row[key]):
        return "-"
    text = _num(row[key])
    if not math.isnan(row[f"{key}_low"]):
        text += f" [{_num(row[f'{key}_low'])}, {_num(row[f'{key}_high'])}] ({_num(row[f'{key}_seed_sd'])})"
    return text


def _p(value: float) -> str:
    return "-" if math.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _difference_cells(row: dict, m: str) -> list[str]:
    """difference [interval], p, p (Holm), effect, TOST: the `{m}_...` fields `report_rows` put."""
    if math.isnan(row.get(f"{m}_diff", math.nan)):
        return ["-"] * 5
    margin, tost = row[f"{m}_margin"], row[f"{m}_tost_p_holm"]
    equivalence = "-" if math.isnan(margin) else (f"{_p(tost)} (± {margin:g})"
                                                  + (", equivalent" if tost < 1 - LEVEL else ""))
    effect = row[f"{m}_effect"]
    return [f"{row[f'{m}_diff']:+.4f} [{row[f'{m}_diff_low']:+.4f}, {row[f'{m}_diff_high']:+.4f}]",
            _p(row[f"{m}_p"]), _p(row[f"{m}_p_holm"]), "-" if math.isnan(effect) else f"{effect:+.2f}", equivalence]


def report_markdown(study: StudyConfig, records: list[TrialRecord], title: bool = True,
                    comparison: Comparison | None = None) -> str:
    """The report in markdown (records: the trials with results, `comparison` theirs when the
    caller has it: it downloads every trial's clip scores); see `report_rows`."""
    c = comparison or compare(study, records)
    rows = report_rows(study, c)
    level = f"{LEVEL:.0%}"
    split_note = ("the test split, at the epoch each trial chose on the validation split" if c.split == "test" else
                  "the validation split, which also chose each trial's best epoch: optimistic (the cache has no "
                  "test split; prepare it with --test-fraction or --split-file)")
    head = lambda cols: ["| configuration | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # noqa: E731
    md = ([f"# Study {study.name}", ""] if title else []) + [
        f"Objective: {study.objective.metric} ({study.objective.mode}); {len(records)} trials with results. "
        f"Numbers from {split_note}.", "", "## Configurations", "",
        f"The seed is the unit: each trial's mean over the clips, then the mean over seeds [{level} t interval, "
        "n seeds - 1 degrees of freedom] (standard deviation between seeds); none with one seed. Parameters and "
        "training seconds per epoch.", ""]
    md += head(["seeds", "parameters", "s/epoch", *(c.prefix + m for m in c.metrics)])
    for row in rows:
        cost = [f"{row[N_PARAMETERS]:,.0f}" if not math.isnan(row[N_PARAMETERS]) else "-",
                f"{row[SECONDS_PER_EPOCH]:.1f}" if not math.isnan(row[SECONDS_PER_EPOCH]) else "-"]
        md.append(f"| {row['configuration']} | {row['seeds']} | " + " | ".join(
            cost + [_interval_cell(row, m) for m in c.metrics]) + " |")
    if len(rows) > 1:
        md += _difference_section(study, c, rows)
    if study.report.factorial or (study.search.algorithm == "grid" and len(study.search.searched() - {SEED}) >= 2):
        md += _factorial_section(c)
    md += _song_section(c, rows)
    if c.split == "test":
        md += ["", "## Validation (the split that chose each trial's epoch)", ""]
        md += head([f"val_{m}" for m in c.metrics])
        for row in rows:
            md.append(f"| {row['configuration']} | " + " | ".join(_interval_cell(row, f"val_{m}")
                                                                 for m in c.metrics) + " |")
    md += reproducibility_section(records)
    present = [k for k in LATENT if any(k in r.best for r in records)]
    if present:
        md += ["", "## Latent diagnostics (validation, at the selected epoch)", "",
               f"Mean over seeds [{level} t interval] (seed SD): active units (of the latent dimensions), KL in nats "
               "per frame, mean posterior sigma, and the z-shuffle gap (near 0: the decoders ignore z); then the "
               "same per latent head (`_f0`, `_loudness`, `_shared`): a head with no active unit, no KL and no "
               "shuffle gap is unused.", ""]
        md += head(present)
        for row in rows:
            trials = c.groups[row["configuration"]]
            dims = next((f" / {r.best[VAL_LATENT_DIMS]:.0f}" for r in trials if VAL_LATENT_DIMS in r.best), "")
            cells = []
            for key in present:
                cell: dict = {}
                _put(cell, "v", seed_interval([r.best[key] for r in trials if key in r.best]))
                cells.append(_interval_cell(cell, "v") + (dims if key == VAL_ACTIVE_UNITS else ""))
            md.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def reproducibility_section(records: list[TrialRecord]) -> list[str]:
    """The trials' reproducibility record (`train.provenance`) once, and a warning for every key
    in which trials differ, naming them."""
    keys = sorted({k for r in records for k in r.record})
    if not keys:
        return []
    md = ["", "## Reproducibility", "", "What every trial recorded (its MLflow tags `repro.*`).", "",
          "| record | value |", "|---|---|"]
    differ = []
    for key in keys:
        values: dict[str, list[str]] = {}
        for r in records:
            values.setdefault(r.record.get(key, "(not recorded)"), []).append(r.name or r.trial)
        if len(values) == 1:
            md.append(f"| {key.removeprefix(RECORD)} | `{next(iter(values))}` |")
        else:
            differ.append(f"- **{key.removeprefix(RECORD)}**: " + "; ".join(
                f"`{value}` ({len(who)} trial{'s' * (len(who) > 1)}: {', '.join(sorted(who)[:4])}"
                f"{' ...' if len(who) > 4 else ''})" for value, who in sorted(values.items())))
    if differ:
        md += ["", f"**Warning: the trials differ in {len(differ)} of these:**", "", *differ]
    return md


def _difference_section(study: StudyConfig, c: Comparison, rows: list[dict]) -> list[str]:
    """One table per metric: each configuration minus the baseline, and how it was computed."""
    baseline = rows[0]["baseline"]
    why = "set in report.baseline" if study.report.baseline.strip() else "the best by the objective"
    md = ["", f"## Differences to {baseline} ({why})", ""]
    methods = set()
    for m in c.metrics:
        md += [f"### {c.prefix}{m}", "", "| configuration | difference [95% CI] | p | p (Holm) | effect (d) | "
               "equivalence: TOST p (Holm) (margin) |", "|---|---|---|---|---|---|"]
        for row in rows:
            if row["configuration"] != baseline:
                md.append(f"| {row['configuration']} | " + " | ".join(_difference_cells(row, m)) + " |")
                if not math.isnan(row.get(f"{m}_diff", math.nan)):
                    methods.add(row[f"{m}_method"])
        md.append("")
    if not methods:
        return md + ["No difference can be estimated: each needs two trials (seeds) of both configurations, "
                     "at least three in all."]
    level = f"{LEVEL:.0%}"
    md += [f"Method: the {' and the '.join(METHODS[k] for k in sorted(methods))}; the difference's {level} "
           "interval and two-sided p-value use t with (trials - 2) degrees of freedom, as the difference varies "
           "between trials. p (Holm): corrected over the comparisons of each metric. Effect (d): the difference "
           "over the standard deviation between seeds, pooled over both configurations. Equivalence: two one-sided "
           f"t-tests against the margin set in report.equivalence (equivalent when its Holm-corrected p < "
           f"{1 - LEVEL:.2f}); '-' where no margin is set."]
    return md


def _factorial_section(c: Comparison) -> list[str]:
    """Main effects and interaction of two crossed searched dimensions, per headline metric."""
    factors = sorted({k for members in c.groups.values() for r in members for k in r.params} - {SEED})
    md = ["", "## Factorial: main effects and interaction", ""]
    if len(factors) != 2:
        return md + [f"A factorial analysis needs exactly two searched dimensions; this study has {len(factors)} "
                     f"({', '.join(factors) or 'none'})."]
    effects = {}
    for m in c.metrics:
        cells: dict[tuple[str, str], list[float]] = {}
        for group, members in c.groups.items():
            for r in members:
                value = (r.final if c.prefix == TEST else r.best).get(c.prefix + m)
                if value is not None and math.isfinite(value):
                    cells.setdefault((str(r.params[factors[0]]), str(r.params[factors[1]])), []).append(value)
        effects[m] = {e.name: e for e in factorial_effects(cells, (factors[0], factors[1]))}
    names = list(dict.fromkeys(name for per_metric in effects.values() for name in per_metric))
    if not names:
        return md + [f"No effect can be estimated: {factors[0]} x {factors[1]} must be fully crossed with two "
                     "trials (seeds) in some cell."]
    md += ["| effect | " + " | ".join(c.prefix + m for m in c.metrics) + " |", "|---|" + "---|" * len(c.metrics)]
    for name in names:
        cells = [(f"{e.estimate:+.4f} [{e.low:+.4f}, {e.high:+.4f}], p {_p(e.p)}" if (e := effects[m].get(name))
                  else "-") for m in c.metrics]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    df = next(iter(next(iter(effects.values())).values())).df
    md += ["", f"Method: a linear model of each trial's mean (the seed is the unit) with one mean per cell; a main "
           f"effect is a level minus the first level (sorted order), averaged over the other dimension's levels; an "
           f"interaction is the difference of differences of a 2 x 2 sub-table. {LEVEL:.0%} t intervals and "
           f"two-sided p-values with {df} degrees of freedom (trials minus cells), not corrected for multiplicity."]
    return md


def _song_section(c: Comparison, rows: list[dict]) -> list[str]:
    """Per song, the first headline metric: each trial's mean over the song's clips, over seeds."""
    if not c.metrics:
        return []
    m = c.metrics[0]
    table = {row["configuration"]: c.song_intervals(row["configuration"], m) for row in rows}
    songs = sorted({song for per_song in table.values() for song in per_song})
    if not songs:
        return []
    md = ["", f"## Per song ({c.prefix}{m})", "",
          f"Each trial's mean over the song's clips, then the mean over seeds [{LEVEL:.0%} t interval] (seed SD).",
          "", "| configuration | " + " | ".join(songs) + " |", "|---|" + "---|" * len(songs)]
    for row in rows:
        cells = []
        for song in songs:
            cell: dict = {}
            if song in table[row["configuration"]]:
                _put(cell, "v", table[row["configuration"]][song])
            cells.append(_interval_cell(cell, "v"))
        md.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    return md


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
    """The report (`report_rows`) as markdown and CSV, with the learning curves' figure, logged to
    the study's parent run and set as its description."""
    record = StudyRecord.started(study)
    records = [r for r in trial_records(study) if r.best]
    out_dir = Path(out_dir) if out_dir else _report_dir(study)
    out_dir.mkdir(parents=True, exist_ok=True)
    comparison = compare(study, records)
    rows = report_rows(study, comparison)
    csv_path = out_dir / f"{study.name}_report.csv"
    with open(csv_path, "w", newline="") as handle:
        fields = list(dict.fromkeys(k for row in rows for k in row)) or ["configuration"]  # the baseline has no diff
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    client = record.client()
    curves = learning_curves(client, comparison.groups, study.objective.metric,
                             out_dir / f"{study.name}_learning_curves.png")
    md_path = out_dir / f"{study.name}_report.md"
    md_path.write_text(report_markdown(study, records, comparison=comparison) + (
        f"\n## Learning curves\n\n{study.objective.metric} per epoch, mean over seeds with its {LEVEL:.0%} t band: "
        f"![learning curves]({curves.name})\n" if curves else ""))
    for path in (md_path, csv_path, *_optuna_figures(study, out_dir), *([curves] if curves else [])):
        client.log_artifact(record.parent_run_id, str(path), "report")
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
