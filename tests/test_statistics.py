"""The report's statistics against direct computations on constructed examples."""
import math

import numpy as np
import pytest
import torch

from diffcraft.study.config import StudyConfig
from diffcraft.study.report import Comparison, report_rows
from diffcraft.study.status import TrialRecord
from diffcraft.train.evaluate import summarize
from diffcraft.train.metrics import mean_of_means, paired_difference, read_clip_table, write_clip_table


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


def test_paired_difference_and_seed_means_match_a_direct_computation():
    rng = np.random.default_rng(0)
    clip_effect = rng.normal(0, 5, 30)  # a large clip-to-clip spread shared by both configurations
    a = {f"c{i}": float(clip_effect[i] + 1.0 + rng.normal(0, 0.1)) for i in range(30)}
    b = {f"c{i}": float(clip_effect[i] + rng.normal(0, 0.1)) for i in range(30)}
    b["only_b"], a["c0"] = 3.0, math.nan
    diff, diff_se, n = paired_difference(a, b)
    direct = [a[f"c{i}"] - b[f"c{i}"] for i in range(1, 30)]
    assert n == 29 and diff == pytest.approx(np.mean(direct)) and diff_se == pytest.approx(se(direct))
    assert diff_se < se(list(a.values())[1:]) / 10  # pairing removes the clip spread
    mean, mean_se, seeds = mean_of_means([1.0, 2.0, 6.0])
    assert (mean, seeds) == (3.0, 3) and mean_se == pytest.approx(se([1, 2, 6]))
    assert math.isnan(mean_of_means([1.0])[1])


def test_clip_tables_round_trip(tmp_path):
    scores = {"mss": torch.tensor([0.1, 0.25]), "rpa": torch.tensor([math.nan, 0.5])}
    text = write_clip_table(tmp_path / "t.csv", ["s/a#0", "s/a#1"], scores).read_text()
    table = read_clip_table(text)
    assert table["mss"] == {"s/a#0": pytest.approx(0.1), "s/a#1": pytest.approx(0.25)}
    assert math.isnan(table["rpa"]["s/a#0"]) and table["rpa"]["s/a#1"] == 0.5


def record(run_id, group_params, seed, test_mss, val_mss):
    return TrialRecord(run_id, run_id, "FINISHED", {**group_params, "train.seed": seed}, str(group_params), seed, 2,
                       {"val_mss_mean": val_mss, "val_loss": val_mss}, {"test_mss_mean": test_mss,
                                                                        "n_parameters": 100.0}, False)


def test_report_rows_compare_configurations_over_seeds_and_paired_clips():
    study = StudyConfig(name="s")
    study.objective.metric, study.objective.mode = "val_loss", "min"
    clips = [f"c{i}" for i in range(5)]
    scores = {"g1s0": [1.0, 2.0, 3.0, 4.0, 5.0], "g1s1": [1.2, 2.2, 3.2, 4.2, 5.2],
              "g2s0": [2.0, 2.5, 3.9, 4.1, 7.0], "g2s1": [2.2, 2.9, 4.1, 4.3, 7.4]}
    tables = {run: {"mss": dict(zip(clips, values))} for run, values in scores.items()}
    records = [record(run, {"core": run[:2]}, run[-1], float(np.mean(v)), float(np.mean(v)) + 0.5)
               for run, v in scores.items()]
    groups = {"core=g1": records[:2], "core=g2": records[2:]}
    rows = report_rows(study, Comparison("test", groups, tables))
    assert [r["configuration"] for r in rows] == ["core=g1", "core=g2"]  # best (lowest val_loss) first
    g2 = rows[1]
    seed_means = [np.mean(scores["g2s0"]), np.mean(scores["g2s1"])]
    assert g2["mss_mean"] == pytest.approx(np.mean(seed_means)) and g2["mss_mean_se_seeds"] == pytest.approx(se(seed_means))
    pooled = scores["g2s0"] + scores["g2s1"]
    assert g2["mss_mean_pooled"] == pytest.approx(np.mean(pooled)) and g2["mss_mean_pooled_n"] == 10
    assert g2["mss_mean_pooled_se"] == pytest.approx(se(pooled))
    per_clip = [(a + b) / 2 - (c + d) / 2 for a, b, c, d in zip(scores["g2s0"], scores["g2s1"], scores["g1s0"],
                                                              scores["g1s1"])]
    assert g2["mss_mean_diff"] == pytest.approx(np.mean(per_clip)) and g2["mss_mean_diff_se"] == pytest.approx(se(per_clip))
    assert g2["val_mss_mean"] == pytest.approx(np.mean(seed_means) + 0.5)
    assert rows[0]["mss_mean_diff"] == 0.0 and g2["n_parameters"] == 100.0


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
