"""The report's statistics against direct computations (scipy, statsmodels) on data built with a
seed effect and a song effect: the seed, not the clip, is the unit."""
import math

import numpy as np
import pytest
import torch

from diffcraft.errors import StudyConfigError
from diffcraft.study.config import StudyConfig
from diffcraft.study.report import Comparison, report_markdown, report_rows
from diffcraft.study.stats import ClipScore, holm, seed_interval
from diffcraft.study.status import TrialRecord
from diffcraft.train.evaluate import summarize
from diffcraft.train.metrics import read_clip_table, write_clip_table
from diffcraft.typed_yaml import from_dict


def se(values):
    values = np.asarray(values, dtype=float)
    return values.std(ddof=1) / math.sqrt(len(values))


def test_per_clip_summaries_leave_out_clips_without_a_score():
    scores = {"mss": torch.tensor([1.0, 2.0, 4.0, 7.0], dtype=torch.float64),
              "rpa": torch.tensor([0.5, math.nan, 1.0, 0.75], dtype=torch.float64)}
    out = summarize(scores, "test_")
    assert out["test_mss_mean"] == pytest.approx(3.5) and out["test_mss_se"] == pytest.approx(se([1, 2, 4, 7]))
    assert out["test_mss_sd"] == pytest.approx(np.std([1, 2, 4, 7], ddof=1))
    assert out["test_rpa"] == pytest.approx(0.75) and out["test_rpa_se"] == pytest.approx(se([0.5, 1.0, 0.75]))
    assert out["test_n_clips"] == 4


def test_clip_tables_round_trip(tmp_path):
    scores = {"mss": torch.tensor([0.1, 0.25]), "rpa": torch.tensor([math.nan, 0.5])}
    text = write_clip_table(tmp_path / "t.csv", ["s/a#0", "s/a#1"], scores).read_text()
    table = read_clip_table(text)
    assert table["mss"] == {"s/a#0": pytest.approx(0.1), "s/a#1": pytest.approx(0.25)}
    assert math.isnan(table["rpa"]["s/a#0"]) and table["rpa"]["s/a#1"] == 0.5


BEST, WORSE, SAME = (f"model.decoder.core={core}" for core in "abc")  # the report's names of three configurations
EFFECTS = {BEST: 0.0, WORSE: 0.6, SAME: 0.02}  # their true differences
SONGS, CLIPS_PER_SONG, SEEDS = ("song0", "song1"), 6, 5


def built_study(seed_sd=0.3, song_sd=1.0, clip_sd=0.3, noise_sd=0.05, rng_seed=0):
    """Trials of three configurations x SEEDS seeds scored on clips of two songs: score = configuration
    effect + seed effect + song effect + clip effect + noise; their Comparison on the test split."""
    rng = np.random.default_rng(rng_seed)
    song = {s: rng.normal(0, song_sd) for s in SONGS}
    clips = {f"{s}/f.wav#{i}": song[s] + rng.normal(0, clip_sd) for s in SONGS for i in range(CLIPS_PER_SONG)}
    records, tables = [], {}
    for config, effect in EFFECTS.items():
        for seed in range(SEEDS):
            run = f"{config}-s{seed}"
            luck = rng.normal(0, seed_sd)
            tables[run] = {"mss": {c: float(effect + luck + base + rng.normal(0, noise_sd))
                                   for c, base in clips.items()}}
            mean = float(np.mean(list(tables[run]["mss"].values())))
            val_loss = effect + (0.01 * seed if config != BEST else -1.0)  # BEST is the best by the objective
            params = {"model.decoder.core": config.split("=")[1], "train.seed": seed}
            records.append(TrialRecord(run, run, "FINISHED", params, config, seed, 2,
                                       {"val_mss_mean": mean + 0.1, "val_loss": val_loss},
                                       {"test_mss_mean": mean, "n_parameters": 100.0}, False))
    groups = {config: [r for r in records if r.group == config] for config in EFFECTS}
    return Comparison("test", groups, tables)


def study_config(**report):
    return from_dict(StudyConfig, {"name": "s", "objective": {"metric": "val_loss", "mode": "min"},
                                   "search": {"space": {"model.decoder.core": {"grid": ["gru", "mamba"]}}},
                                   "report": report})


def long_frame(comparison, configs):
    import pandas as pd

    return pd.DataFrame([{"y": v, "x": float(config == configs[0]), "trial": run, "song": clip.split("/")[0],
                          "clip": clip} for config in configs for r in comparison.groups[config]
                         for run in [r.run_id] for clip, v in comparison.tables[run]["mss"].items()])


def test_each_configuration_is_its_mean_over_seeds_with_a_t_interval():
    from scipy import stats

    c = built_study()
    rows = {row["configuration"]: row for row in report_rows(study_config(), c)}
    for config, members in c.groups.items():
        means = [np.mean(list(c.tables[r.run_id]["mss"].values())) for r in members]
        low, high = stats.t.interval(0.95, len(means) - 1, loc=np.mean(means), scale=stats.sem(means))
        row = rows[config]
        assert row["mss_mean"] == pytest.approx(np.mean(means))
        assert (row["mss_mean_low"], row["mss_mean_high"]) == (pytest.approx(low), pytest.approx(high))
        assert row["mss_mean_seed_sd"] == pytest.approx(np.std(means, ddof=1))
        assert high - low > 2 * 2 * stats.sem(means)  # 4 degrees of freedom: wider than ± 2 SE
    one = seed_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.sd)


def test_differences_come_from_a_mixed_model_with_seed_song_and_clip_effects():
    import statsmodels.formula.api as smf
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    c = built_study()
    rows = {row["configuration"]: row for row in report_rows(study_config(), c)}
    assert rows[WORSE]["baseline"] == BEST  # the best by the objective
    direct_p = {}
    for config in (WORSE, SAME):
        frame = long_frame(c, [config, BEST])
        fit = smf.mixedlm("y ~ x", frame, groups=np.ones(len(frame)), re_formula="0",
                          vc_formula={k: f"0 + C({k})" for k in ("trial", "song", "clip")}).fit(reml=True)
        estimate, se_, df = fit.params["x"], fit.bse["x"], 2 * SEEDS - 2
        row = rows[config]
        assert row["mss_mean_diff"] == pytest.approx(estimate, rel=1e-6)
        assert row["mss_mean_diff_se"] == pytest.approx(se_, rel=1e-6)
        half = stats.t.ppf(0.975, df) * se_
        assert (row["mss_mean_diff_low"], row["mss_mean_diff_high"]) == (pytest.approx(estimate - half),
                                                                         pytest.approx(estimate + half))
        direct_p[config] = 2 * stats.t.sf(abs(estimate / se_), df)
        assert row["mss_mean_p"] == pytest.approx(direct_p[config])
        # balanced data: the same answer as Student's t on the seed means, the unit
        a = [r.final["test_mss_mean"] for r in c.groups[BEST]]
        b = [r.final["test_mss_mean"] for r in c.groups[config]]
        assert row["mss_mean_p"] == pytest.approx(stats.ttest_ind(b, a).pvalue, rel=0.05)
        pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
        assert row["mss_mean_effect"] == pytest.approx(estimate / pooled)
        # a clip-level paired test of the seed-averaged clips (what the report did) is far too confident
        naive = stats.ttest_rel(*(np.mean([list(c.tables[r.run_id]["mss"].values()) for r in c.groups[g]], 0)
                                  for g in (config, BEST))).pvalue
        assert naive < row["mss_mean_p"] / 10
    holm_direct = multipletests([direct_p[WORSE], direct_p[SAME]], method="holm")[1]
    assert [rows[k]["mss_mean_p_holm"] for k in (WORSE, SAME)] == pytest.approx(list(holm_direct))
    assert rows[WORSE]["mss_mean_p_holm"] < 0.05 < rows[SAME]["mss_mean_p_holm"]


def test_equivalence_is_tost_with_the_study_files_margin():
    from statsmodels.stats.weightstats import ttost_ind

    c = built_study(seed_sd=0.05)
    rows = {row["configuration"]: row for row in report_rows(study_config(equivalence={"mss_mean": 0.2}), c)}
    a = [r.final["test_mss_mean"] for r in c.groups[BEST]]
    for config in (WORSE, SAME):
        b = [r.final["test_mss_mean"] for r in c.groups[config]]
        direct = ttost_ind(b, a, -0.2, 0.2, usevar="pooled")[0]
        assert rows[config]["mss_mean_tost_p"] == pytest.approx(direct, rel=0.05)
    assert rows[SAME]["mss_mean_tost_p_holm"] < 0.05 < rows[WORSE]["mss_mean_tost_p_holm"]
    text = report_markdown(study_config(equivalence={"mss_mean": 0.2}), [r for g in c.groups.values() for r in g],
                           comparison=c)
    line = next(line for line in text.splitlines() if line.startswith(f"| {SAME}") and "(± 0.2)" in line)
    assert "equivalent" in line and "linear mixed model" in text and "Holm" in text


def test_a_named_baseline_is_what_the_others_are_compared_to():
    c = built_study()
    rows = {row["configuration"]: row for row in report_rows(study_config(baseline=WORSE), c)}
    assert rows[BEST]["baseline"] == WORSE and rows[BEST]["mss_mean_diff"] < 0
    assert "mss_mean_diff" not in rows[WORSE]
    with pytest.raises(StudyConfigError, match="report.baseline: 'model.decoder.core=z'"):
        report_rows(study_config(baseline="model.decoder.core=z"), c)


def test_per_song_table_averages_each_trials_clips_of_the_song_over_seeds():
    c = built_study()
    intervals = c.song_intervals(WORSE, "mss_mean")
    assert set(intervals) == set(SONGS)
    per_trial = [np.mean([v for k, v in c.tables[r.run_id]["mss"].items() if k.startswith("song1/")])
                 for r in c.groups[WORSE]]
    assert intervals["song1"].mean == pytest.approx(np.mean(per_trial))
    assert intervals["song1"].sd == pytest.approx(np.std(per_trial, ddof=1))


def test_holm_matches_statsmodels_and_leaves_nan_out():
    from statsmodels.stats.multitest import multipletests

    p = [0.01, 0.04, 0.03, 0.2]
    assert holm(p + [math.nan])[:4] == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert math.isnan(holm([0.1, math.nan])[1])


def test_trials_without_clip_scores_are_compared_on_their_means_by_students_t():
    from scipy import stats

    c = built_study()
    c.tables = {}
    rows = {row["configuration"]: row for row in report_rows(study_config(), c)}
    a = [r.final["test_mss_mean"] for r in c.groups[BEST]]
    b = [r.final["test_mss_mean"] for r in c.groups[WORSE]]
    assert rows[WORSE]["mss_mean_p"] == pytest.approx(stats.ttest_ind(b, a).pvalue)
    assert rows[WORSE]["mss_mean_method"] == "seed means"


@pytest.mark.parametrize("report, message", [
    ({"equivalence": {"loss": 0.1}}, "report.equivalence.loss: not a metric"),
    ({"equivalence": {"mss_mean": -0.1}}, "report.equivalence.mss_mean: the margin must be a positive number"),
    ({"baseline": "train.lr=0.1"}, "report.baseline: 'train.lr=0.1' is not key=value of a searched dimension"),
])
def test_invalid_report_fields_are_named(report, message):
    with pytest.raises(StudyConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        study_config(**report).validate()


def test_every_score_has_one_value_per_clip_when_the_last_batch_holds_one_clip():
    """The z-shuffle gap needs two clips in a batch; a batch of one still gets a (nan) score, so
    the per-clip table stays aligned."""
    from contextlib import nullcontext

    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.models.autoencoder import DiffCraft, ModelConfig
    from diffcraft.train.evaluate import clip_scores
    from diffcraft.typed_yaml import from_dict

    model = DiffCraft(from_dict(ModelConfig, {"stage": "encoder", "encoder": {
        "encoding": "separate", "latent": "vae", "core": "gru", "width": 8, "latent_size": 2, "head_width": 8}}))
    generator = torch.Generator().manual_seed(0)

    def batch(n):
        return {"audio": 0.1 * torch.randn(n, 64000, generator=generator), "f0_hz": torch.full((n, 400), 440.0),
                "voicing": torch.ones(n, 400), "loudness_db": torch.full((n, 400), -30.0)}

    scores, latent = clip_scores(model, [batch(2), batch(1)], MultiScaleSpectralLoss(), torch.device("cpu"),
                                 nullcontext)
    assert {name: len(values) for name, values in scores.items()} == {
        name: 3 for name in ("f0_loss", "loudness_loss", "rpa", "rca", "loudness_mae_db", "kl", "shuffle_gap")}
    assert not math.isnan(scores["shuffle_gap"][0]) and math.isnan(scores["shuffle_gap"][2])
    assert latent["latent_dims"] == 4


def test_collapse_diagnostics_name_the_head_that_collapsed():
    """A loudness head whose posterior is the prior on every frame: no active unit, no KL, and
    shuffling its z changes nothing; the F0 head carries all of the totals."""
    from contextlib import nullcontext

    from diffcraft.losses import MultiScaleSpectralLoss
    from diffcraft.models.autoencoder import DiffCraft, ModelConfig
    from diffcraft.train.evaluate import clip_scores
    from diffcraft.typed_yaml import from_dict

    torch.manual_seed(0)
    model = DiffCraft(from_dict(ModelConfig, {"stage": "encoder", "encoder": {
        "encoding": "separate", "latent": "vae", "core": "gru", "width": 8, "latent_size": 3, "head_width": 8}}))
    with torch.no_grad():
        model.encoder.heads["loudness"].proj.weight.zero_()
        model.encoder.heads["loudness"].proj.bias.zero_()
        model.encoder.heads["f0"].proj.weight.mul_(30.0)
    generator = torch.Generator().manual_seed(1)
    batches = [{"audio": 0.3 * torch.randn(3, 64000, generator=generator),
                "f0_hz": 200 + 300 * torch.rand(3, 1, generator=generator).expand(3, 400),
                "voicing": torch.ones(3, 400), "loudness_db": torch.full((3, 400), -30.0)} for _ in range(2)]
    scores, latent = clip_scores(model, batches, MultiScaleSpectralLoss(), torch.device("cpu"), nullcontext)
    assert latent["active_units_loudness"] == 0 and latent["active_units_f0"] == latent["active_units"] > 0
    assert latent["kl_loudness"] == 0.0 and latent["kl_f0"] == pytest.approx(float(scores["kl"].mean()))
    assert latent["shuffle_gap_loudness"] == 0.0 and latent["shuffle_gap_f0"] != 0.0
    assert latent["shuffle_gap_f0"] == pytest.approx(float(scores["shuffle_gap"].mean()))


def test_the_report_shows_latent_diagnostics_per_head():
    c = built_study()
    for i, r in enumerate(r for group in c.groups.values() for r in group):
        r.best.update({"val_active_units": 3.0 + i % 2, "val_latent_dims": 8.0, "val_active_units_f0": 3.0 + i % 2,
                       "val_active_units_loudness": 0.0, "val_kl_loudness": 0.0})
    text = report_markdown(study_config(), [r for g in c.groups.values() for r in g], comparison=c)
    section = text.split("## Latent diagnostics")[1]
    assert "| val_active_units | val_active_units_f0 | val_active_units_loudness | val_kl_loudness |" in section
    row = next(line for line in section.splitlines() if line.startswith(f"| {WORSE} |"))
    assert row.split(" | ")[3].startswith("0.0000") and " / 8" in row.split(" | ")[1]


def test_factorial_effects_are_contrasts_of_a_cell_means_model():
    import pandas as pd
    import statsmodels.formula.api as smf

    from diffcraft.study.stats import factorial_effects

    rng = np.random.default_rng(3)
    truth = {("a0", "b0"): 0.0, ("a0", "b1"): 0.5, ("a1", "b0"): 1.0, ("a1", "b1"): 0.2, ("a2", "b0"): 0.3,
             ("a2", "b1"): 0.9}
    cells = {k: list(v + rng.normal(0, 0.2, 3 + (k == ("a1", "b1")))) for k, v in truth.items()}  # one cell of 4
    effects = {e.name: e for e in factorial_effects(cells, ("A", "B"))}
    frame = pd.DataFrame([{"y": y, "cell": f"{a}|{b}"} for (a, b), ys in cells.items() for y in ys])
    fit = smf.ols("y ~ 0 + C(cell)", frame).fit()
    order = [name[len("C(cell)["):-1] for name in fit.params.index]

    def weights(spec):
        return np.array([spec.get(tuple(cell.split("|")), 0.0) for cell in order])

    expected = {
        "A: a1 vs a0": {("a1", "b0"): 0.5, ("a1", "b1"): 0.5, ("a0", "b0"): -0.5, ("a0", "b1"): -0.5},
        "B: b1 vs b0": {(a, "b1"): 1 / 3 for a in ("a0", "a1", "a2")} | {(a, "b0"): -1 / 3 for a in ("a0", "a1", "a2")},
        "A x B: (a2, b1)": {("a2", "b1"): 1, ("a0", "b1"): -1, ("a2", "b0"): -1, ("a0", "b0"): 1}}
    for name, spec in expected.items():
        test = fit.t_test(weights(spec))
        low, high = test.conf_int(alpha=0.05)[0]
        e = effects[name]
        assert (e.estimate, e.low, e.high) == (pytest.approx(float(test.effect[0])), pytest.approx(low),
                                               pytest.approx(high))
        assert e.p == pytest.approx(float(test.pvalue)) and e.df == fit.df_resid == 19 - 6
    assert set(effects) == {"A: a1 vs a0", "A: a2 vs a0", "B: b1 vs b0", "A x B: (a1, b1)", "A x B: (a2, b1)"}
    assert factorial_effects({("a0", "b0"): [1.0, 2.0], ("a1", "b1"): [1.0, 2.0]}, ("A", "B")) == []  # not crossed


def test_a_grid_of_two_dimensions_gets_the_factorial_section():
    c = built_study()
    for r in (r for group in c.groups.values() for r in group):
        r.params["loss.kl.beta"] = str(int(r.seed) % 2)  # a second dimension, crossed with the first
    study = study_config()
    study.search.algorithm = "grid"
    study.search.space["loss.kl.beta"] = study.search.space["model.decoder.core"]
    text = report_markdown(study, [r for g in c.groups.values() for r in g], comparison=c)
    section = text.split("## Factorial: main effects and interaction")[1].split("\n## ")[0]
    assert "| loss.kl.beta: 1 vs 0 |" in section and "| model.decoder.core: b vs a |" in section
    assert "| loss.kl.beta x model.decoder.core: (1, c) |" in section and "degrees of freedom" in section


def test_learning_curves_are_each_epochs_mean_and_t_band_over_the_seeds_that_reached_it(tmp_path):
    from scipy import stats

    from diffcraft.study.curves import curve_bands, plot_curves

    histories = {"gru": [{0: 3.0, 1: 2.0, 2: 1.5}, {0: 3.4, 1: 2.2, 2: 1.1}, {0: 2.9, 1: 2.5}],
                 "mamba": [{0: 2.0, 1: 1.0}]}
    bands = curve_bands(histories)
    epoch1 = dict(bands["gru"])[1]
    low, high = stats.t.interval(0.95, 2, loc=np.mean([2.0, 2.2, 2.5]), scale=stats.sem([2.0, 2.2, 2.5]))
    assert (epoch1.mean, epoch1.low, epoch1.high, epoch1.n) == (pytest.approx(np.mean([2.0, 2.2, 2.5])),
                                                                 pytest.approx(low), pytest.approx(high), 3)
    assert dict(bands["gru"])[2].n == 2 and math.isnan(dict(bands["mamba"])[0].low)
    path = plot_curves(bands, "val_mss_mean", tmp_path / "curves.png")
    assert path.stat().st_size > 5000


def test_scores_without_spread_give_no_difference_rather_than_an_error():
    from diffcraft.study.stats import difference

    scores = [ClipScore(config, f"{config}{seed}", f"song/f#{clip}", 1.0) for config in "ab" for seed in range(3)
              for clip in range(4)]
    d = difference(scores, "a", "b", {"a": [1.0] * 3, "b": [1.0] * 3})
    assert math.isnan(d.p) and math.isnan(d.effect)
