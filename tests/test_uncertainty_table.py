"""Uncertainty in tables and plots: runs of one cell over seeds merged into mean ± std (and the EDM2 minimum), a
bootstrap std shown as ±, and both drawn as error bars."""

import csv
import io
import math

import pytest
from matplotlib.container import ErrorbarContainer

from evaluations.evaluator import RESULT_FORMAT
from evaluations.table import draw_plots, make_table_from_results
from evaluations.uncertainty import aggregate_seeds, seed_run_name, split_seed_run

# Hand-computed: FID 10, 12, 17 -> mean 13, deviations -3, -1, 4, sum of squares 26, std (ddof=1) sqrt(26 / 2) =
# sqrt(13) = 3.6056, min 10. IS 100, 110, 120 -> 110 +- 10. Precision 0.6, 0.7, 0.8 -> 0.7 +- 0.1.
# Recall 0.5, 0.5, 0.8 -> 0.6 +- sqrt(0.06 / 2) = 0.1732. sFID 4, 5, 6 -> 5 +- 1, min 4.
SEED_METRICS = [dict(fid=10.0, inception_score=100.0, precision=0.6, recall=0.5, sfid=4.0),
                dict(fid=12.0, inception_score=110.0, precision=0.7, recall=0.5, sfid=5.0),
                dict(fid=17.0, inception_score=120.0, precision=0.8, recall=0.8, sfid=6.0)]


def result(m, **extra):
    return dict(m, format=RESULT_FORMAT, random_weights=False, sample={"num_images": 1000}, **extra)


def seed_runs(scale=1.0, cell="pag_scale-1.0"):
    return [{"run": seed_run_name(cell, seed), "values": {"pag_scale": scale, "seed": seed}, "result": result(m)}
            for seed, m in zip((2, 0, 1), SEED_METRICS)]  # out of seed order: the merge sorts them


def bootstrap_run():
    boot = {k: {"std": s, "low": 0.0, "high": 1.0} for k, s in
            (("fid", 0.5), ("sfid", 0.25), ("inception_score", 2.0), ("precision", 0.01), ("recall", 0.02))}
    return {"run": "pag_scale-0", "values": {"pag_scale": 0.0},
            "result": result(dict(fid=20.0, inception_score=90.0, precision=0.5, recall=0.7, sfid=8.0),
                             bootstrap=dict(boot, k=50, seed=0, level=0.95))}


def test_seed_run_names_round_trip():
    assert seed_run_name("pag_scale-2__sampler-ddim25", 3) == "pag_scale-2__sampler-ddim25__seed-3"
    assert split_seed_run("pag_scale-2__sampler-ddim25__seed-3") == ("pag_scale-2__sampler-ddim25", 3)
    assert split_seed_run("pag_scale-2") == ("pag_scale-2", None)
    assert split_seed_run("__seed-3") == ("__seed-3", None)  # no cell before the suffix


def test_seed_aggregation_matches_hand_computed_means_and_stds():
    rows = [dict(run=r["run"], experiment="e", **r["result"]) for r in seed_runs()]
    (row,) = aggregate_seeds(rows, minimum=True)
    assert row["run"] == "pag_scale-1.0" and row["seeds"] == 3 and row["seed_values"] == [0, 1, 2]
    assert row["fid"] == pytest.approx(13.0) and row["fid_std"] == pytest.approx(math.sqrt(13))
    assert row["fid_min"] == 10.0 and row["sfid_min"] == 4.0 and "inception_score_min" not in row
    assert (row["inception_score"], row["inception_score_std"]) == (pytest.approx(110.0), pytest.approx(10.0))
    assert (row["precision"], row["precision_std"]) == (pytest.approx(0.7), pytest.approx(0.1))
    assert (row["recall"], row["recall_std"]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.03)))
    assert "fid_min" not in aggregate_seeds(rows)[0]  # the minimum only when asked
    # A metric missing from one seed's result is not averaged over the others; a lone seed has no std.
    rows[1].pop("recall")
    assert aggregate_seeds(rows)[0]["recall"] is None
    lone = aggregate_seeds(rows[:1])[0]
    assert lone["seeds"] == 1 and lone["fid"] == 10.0 and lone["fid_std"] is None
    # Runs that differ in more than their seed are not averaged (a table of two sweeps, another num_samples), nor
    # are two runs of one seed.
    unlike = [dict(row, num_samples=n) for row, n in zip(rows, (1000, 1000, 50000))]
    with pytest.raises(ValueError, match="differ in num_samples"):
        aggregate_seeds(unlike)
    twice = rows + [dict(rows[0])]
    with pytest.raises(ValueError, match="appears in two runs"):
        aggregate_seeds(twice)


def test_table_renders_plus_minus_and_minimum(tmp_path):
    tables = make_table_from_results(seed_runs() + [bootstrap_run()], str(tmp_path), experiment="e", minimum=True)
    md = (tmp_path / "e.md").read_text()
    seeds_line = next(line for line in md.splitlines() if line.startswith("| pag_scale-1.0 |"))
    assert "13.00 \u00b1 3.61" in seeds_line and "110.00 \u00b1 10.00" in seeds_line
    assert "0.700 \u00b1 0.100" in seeds_line and "| 10.00 |" in seeds_line and "| 3 |" in seeds_line
    boot_line = next(line for line in md.splitlines() if line.startswith("| pag_scale-0 |"))
    assert "20.00 \u00b1 0.50" in boot_line and "0.500 \u00b1 0.010" in boot_line
    assert "| FID min | sFID min | seeds | N |" in md
    assert "ddof=1" in md and "bootstrap of 50" in md
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO((tmp_path / "e.csv").read_text()))}
    assert float(rows["pag_scale-1.0"]["fid_std"]) == pytest.approx(math.sqrt(13))
    assert rows["pag_scale-1.0"]["uncertainty"] == "3 seeds" and float(rows["pag_scale-0"]["fid_std"]) == 0.5
    assert r"13.00 $\pm$ 3.61" in (tmp_path / "e.tex").read_text()
    assert len(tables["e"]["rows"]) == 2
    plain = make_table_from_results(seed_runs(), str(tmp_path / "plain"), experiment="e")
    assert "FID min" not in (tmp_path / "plain" / "e.md").read_text() and len(plain["e"]["rows"]) == 1


def test_plots_draw_the_spread_as_error_bars():
    rows = aggregate_seeds([dict(run=r["run"], experiment="e", source="ours", marker=None, pag_scale=1.0,
                                 **r["result"]) for r in seed_runs()])
    rows += [dict(run="pag_scale-0", experiment="e", source="ours", marker=None, pag_scale=0.0, fid=20.0,
                  fid_std=0.5, inception_score=90.0, inception_score_std=2.0, precision=0.5, recall=0.7)]
    figures = draw_plots(rows, ("pag_scale",))
    fid_ax = figures["_fid_is.png"].axes[0]
    (bars,) = [c for c in fid_ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars.has_yerr
    half_lengths = sorted((seg[1][1] - seg[0][1]) / 2 for seg in bars.lines[2][0].get_segments())
    assert half_lengths == pytest.approx([0.5, math.sqrt(13)])
    (pr,) = [c for c in figures["_pr.png"].axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert pr.has_xerr and pr.has_yerr
