"""make demo's claims (results/demo/claims.json): computed from the table it printed, never typed in."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from demo import pipeline
from demo.data import make_dataset

ROWS = [  # a table CSV's rows over 3 seeds: mean and std columns as the table code writes them
    {"run": "method-baseline", "pag_scale": "0.0", "fid": "40.0", "fid_std": "1.0", "precision": "0.30",
     "precision_std": "0.01", "recall": "0.50", "recall_std": "0.02", "seeds": "3", "source": "ours"},
    {"run": "method-pag_s1", "pag_scale": "1.0", "fid": "35.0", "fid_std": "2.0", "precision": "0.40",
     "precision_std": "0.01", "recall": "0.45", "recall_std": "0.02", "seeds": "3", "source": "ours"},
    {"run": "method-pag_s2", "pag_scale": "2.0", "fid": "30.0", "fid_std": "1.5", "precision": "0.50",
     "precision_std": "", "recall": "0.40", "recall_std": "0.02", "seeds": "3", "source": "ours"},
    {"run": "ADM (paper)", "pag_scale": "0.0", "fid": "5.0", "fid_std": "", "source": "Ahn et al."},
]


def test_claims_pick_the_best_scale_and_test_three_combined_stds():
    claims = pipeline.demo_claims(ROWS)
    assert claims["baseline_fid_mean"] == 40.0 and claims["baseline_fid_std"] == 1.0
    assert claims["best_pag_scale"] == 2.0
    assert claims["best_pag_fid_mean"] == 30.0 and claims["best_pag_fid_std"] == 1.5
    assert claims["combined_std"] == pytest.approx(math.sqrt(1.0 + 2.25))
    assert claims["fid_gain"] == 10.0 and claims["resolved"] is True  # 10 > 3 * 1.80
    assert [e["pag_scale"] for e in claims["by_scale"]] == [0.0, 1.0, 2.0]  # the anchor row is not ours
    assert [e["precision"] for e in claims["by_scale"]] == [0.30, 0.40, 0.50]
    assert claims["by_scale"][2]["precision_std"] is None and claims["seeds"] == 3
    text = pipeline.claims_text(claims)
    assert "baseline 40.00 ± 1.00" in text and "s = 2: 30.00 ± 1.50" in text and ": resolved." in text
    assert "precision by s: 0: 0.300 ± 0.010, 1: 0.400 ± 0.010, 2: 0.500" in text


def test_claims_not_resolved_within_three_stds_and_absent_without_a_spread():
    close = [dict(row) for row in ROWS[:3]]
    close[2]["fid"] = "36.0"  # gain 5 (s = 1 still lies higher) < 3 * hypot(1, 2) = 6.7
    close[1]["fid"] = "37.0"
    claims = pipeline.demo_claims(close)
    assert claims["best_pag_scale"] == 2.0 and claims["resolved"] is False
    assert "NOT resolved" in pipeline.claims_text(claims)
    no_spread = [dict(row, fid_std="") for row in ROWS[:3]]
    assert pipeline.demo_claims(no_spread) is None  # one seed: nothing to claim
    assert pipeline.demo_claims(ROWS[1:3]) is None  # no baseline row


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for row in ROWS for k in row}))
        writer.writeheader()
        writer.writerows(rows)


def test_write_claims_reads_the_table_csv_and_never_leaves_an_old_claim(tmp_path):
    table = tmp_path / "demo.csv"
    _write_csv(table, ROWS)
    claims = pipeline.write_claims(table, tmp_path / "claims.json")
    stored = json.loads((tmp_path / "claims.json").read_text())
    assert stored["best_pag_fid_mean"] == claims["best_pag_fid_mean"] == 30.0 and stored["table"] == str(table)
    _write_csv(table, [dict(row, fid_std="") for row in ROWS])  # a later run with nothing to claim
    assert pipeline.write_claims(table, tmp_path / "claims.json") is None
    assert not (tmp_path / "claims.json").exists()


def test_claim_text_keeps_a_zero_spread():
    rows = [dict(row) for row in ROWS[:3]]
    rows[0]["precision_std"] = "0.0"  # precision moves in steps of 1/N: three equal seeds happen
    assert "precision by s: 0: 0.300 ± 0.000, 1:" in pipeline.claims_text(pipeline.demo_claims(rows))


def test_prepare_draws_the_reference_from_the_models_data_set(tmp_path):
    for name in ("adm_mirror", "adm_demo"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "kind": "diffusion", "flags": {}}))
    config = {"base": {"model": str(tmp_path / "adm_mirror.yaml")}, "ref_batch": str(tmp_path / "ref.npz")}
    assert pipeline.model_dataset(config) == "mirror"
    pipeline.prepare(config, 12)
    with np.load(tmp_path / "ref.npz") as npz:
        images = npz["arr_0"]
    np.testing.assert_array_equal(images, images[:, :, ::-1])  # mirror images
    np.testing.assert_array_equal(images, make_dataset(12, pipeline.REFERENCE_SEED, kind="mirror")[0])
    pipeline.prepare(config, 12)  # already there: kept
    shapes = dict(config, base={"model": str(tmp_path / "adm_demo.yaml")})
    with pytest.raises(SystemExit, match="holds other images than 12 held-out images of the shapes data set"):
        pipeline.prepare(shapes, 12)
    with pytest.raises(SystemExit, match="model 'other' is none of the demo's models"):
        (tmp_path / "other.yaml").write_text(yaml.safe_dump({"name": "other", "kind": "diffusion", "flags": {}}))
        pipeline.model_dataset({"base": {"model": str(tmp_path / "other.yaml")}})


def test_write_claims_without_a_table_csv_claims_nothing(tmp_path):
    (tmp_path / "claims.json").write_text('{"resolved": true}\n')  # from an earlier run
    assert pipeline.write_claims(tmp_path / "missing.csv", tmp_path / "claims.json") is None
    assert not (tmp_path / "claims.json").exists()
