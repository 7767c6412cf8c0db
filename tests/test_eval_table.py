"""Tables and plots from many runs' evaluator JSON (no network, no Inception)."""

import csv
import io
import json
import os
import re

import pytest
import yaml

from evaluations import regression
from evaluations.evaluator import RESULT_FORMAT, format_lines
from evaluations.table import load_anchors, load_run, make_table, normalise_anchor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHORS_MD = os.path.join(REPO, "..", "shared", "reference", "anchors.md")


def write_run(root, name, metrics, config, random_weights=False, json_name="eval.json"):
    run = root / name
    run.mkdir(parents=True)
    result = dict(metrics, format=RESULT_FORMAT, random_weights=random_weights,
                  sample={"path": "/x/samples.npz", "num_images": 50000})
    (run / json_name).write_text(json.dumps(result))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def metrics(fid, is_, prec=0.7, rec=0.6, sfid=5.0):
    return {"inception_score": is_, "fid": fid, "sfid": sfid, "precision": prec, "recall": rec}


LAYERS = ["input_blocks.14.1", "middle_block.1"]


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "results" / "pag_uncond"
    made = [
        write_run(root, "s3", metrics(15.5, 60.25, 0.75, 0.5), {"pag_scale": 3.0, "pag_layers": LAYERS,
                  "perturbation": "identity", "use_ddim": False, "timestep_respacing": "250",
                  "sampler_label": "DDPM-250"}),
        write_run(root, "s0", metrics(26.125, 39.5), {"pag_scale": 0.0, "pag_layers": LAYERS,
                  "perturbation": "identity", "use_ddim": False, "timestep_respacing": "250",
                  "sampler_label": "DDPM-250"}),
        write_run(root, "s1", metrics(20.0, 45.0), {"sampling": {"pag_scale": 1.0, "pag_layers": LAYERS,
                  "perturbation": "identity", "use_ddim": False, "timestep_respacing": "250"},
                  "sampler_label": "DDPM-250"}),
        write_run(root, "ddim_s3", metrics(18.0, 50.0), {"pag_scale": 3.0, "pag_layers": LAYERS,
                  "perturbation": "identity", "use_ddim": True, "timestep_respacing": "ddim25",
                  "sampler_label": "DDIM-25"}, json_name="metrics.json"),
    ]
    return root, made


ANCHORS = [
    {"label": "ADM baseline", "FID": 26.21, "sFID": 6.35, "IS": 39.70, "Precision": 0.61, "Recall": 0.63,
     "pag_scale": 0.0, "source": "SAG README"},
    {"label": "SAG s=0.5", "FID": 20.31, "sFID": 5.09, "IS": 45.30, "Precision": 0.66, "Recall": 0.61},
    {"method": "CG", "FID": 2.97, "IS": "-"},
]


def test_markdown_csv_latex_and_plots(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "tables"
    tables = make_table([root], out, anchors=ANCHORS)
    assert list(tables) == ["pag_uncond"]  # experiment = directory above the run directories
    table = tables["pag_uncond"]
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    # Blocks of equal layers / perturbation / sampler, pag_scale ascending inside each; the sampler is the run
    # record's sampler_label.
    # Unguided rows (pag_scale 0: no layers, shown as "-") come first, then each layer set by scale.
    assert [(r["sampler"], r["pag_scale"]) for r in ours] == [
        ("DDPM-250", 0.0), ("DDIM-25", 3.0), ("DDPM-250", 1.0), ("DDPM-250", 3.0)]
    assert ours[0]["pag_layers"] == "-"
    assert ours[1]["pag_layers"] == "input_blocks.14.1, middle_block.1"  # found in a nested config too
    assert [r["run"] for r in table["rows"][4:]] == ["ADM baseline", "SAG s=0.5", "CG"]

    md = (out / "pag_uncond.md").read_text()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert lines[0] == ("| run | pag_scale | pag_layers | perturbation | sampler | FID | sFID | IS | Precision "
                        "| Recall | N | source |")
    assert lines[2] == "| s0 | 0 | - | - | DDPM-250 | 26.12 | 5.00 | 39.50 | 0.700 | 0.600 | 50000 | ours |"
    assert "| ADM baseline | 0 | - | - | - | 26.21 | 6.35 | 39.70 | 0.610 | 0.630 | - | published (SAG README) |" in md
    assert "| CG | - | - | - | - | 2.97 | - | - | - | - | - | published |" in md

    rows = list(csv.DictReader(io.StringIO((out / "pag_uncond.csv").read_text())))
    assert len(rows) == 7
    assert float(rows[3]["fid"]) == 15.5 and rows[3]["sampler"] == "DDPM-250"  # full precision in CSV
    assert [r["run"] for r in rows[:4]] == ["s0", "ddim_s3", "s1", "s3"]
    assert rows[3]["json"].endswith(os.path.join("s3", "eval.json"))

    tex = (out / "pag_uncond.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert r"pag\_scale" in tex and r"input\_blocks.14.1" in tex
    assert tex.count(r"\midrule") == 2  # after the header and between ours and published
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
    assert len(body) == 1 + 7 and all(ln.count("&") == 11 for ln in body)

    for name in ("pag_uncond_fid_is.png", "pag_uncond_pr.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_sampler_column_is_the_records_label_never_derived(tmp_path):
    """Issue 20, defect 1: the table shows the label the run record stores (the sampler's, which alone derives
    it); a table that derived it again from use_ddim / timestep_respacing named these two wrongly (DDIM-? for DDIM
    without respacing, DDPM-1000 for a 4000-step model). A record written before labels shows "?"."""
    root = tmp_path / "exp"
    write_run(root, "ddim", metrics(10.0, 50.0), {"settings": {"pag_scale": 1.0, "use_ddim": True,
              "timestep_respacing": "", "diffusion_steps": 1000}, "sampler_label": "DDIM-1000"})
    write_run(root, "steps4000", metrics(11.0, 50.0), {"settings": {"pag_scale": 2.0, "use_ddim": False,
              "timestep_respacing": "", "diffusion_steps": 4000}, "sampler_label": "DDPM-4000"})
    write_run(root, "old", metrics(12.0, 50.0), {"settings": {"pag_scale": 3.0, "use_ddim": False,
              "timestep_respacing": "250"}})
    rows = make_table([root], tmp_path / "out", plots=False)["exp"]["rows"]
    assert {r["run"]: r["sampler"] for r in rows} == {"ddim": "DDIM-1000", "steps4000": "DDPM-4000", "old": "?"}
    md = (tmp_path / "out" / "exp.md").read_text().splitlines()
    assert md[2] == "| run | pag_scale | sampler | FID | sFID | IS | Precision | Recall | N | source |"
    assert {ln.split(" | ")[0][2:]: ln.split(" | ")[2] for ln in md[4:7]} == {"ddim": "DDIM-1000",
                                                                           "steps4000": "DDPM-4000", "old": "?"}


def test_experiment_name_from_the_config_even_empty(tmp_path):
    assert load_run(write_run(tmp_path / "dir", "a", metrics(10.0, 50.0), {"experiment": ""}))["experiment"] == ""
    assert load_run(write_run(tmp_path / "dir", "b", metrics(10.0, 50.0), {"pag_scale": 1.0}))["experiment"] == "dir"


def test_metric_names_are_one_table():
    """The evaluator's printed labels, the table's headers and formats and the anchors' spellings come from
    evaluations.metrics.METRIC_TABLE."""
    from evaluations.metrics import METRIC_TABLE

    assert [m.header for m in METRIC_TABLE] == ["FID", "sFID", "IS", "Precision", "Recall", "FD_DINOv2"]
    result = dict(metrics(3.5, 200.0, 0.8265, 0.5309, 6.25), fd_dinov2=1.5)
    assert [ln.split(":")[0] for ln in format_lines(result)] == [
        "Inception Score", "FID", "sFID", "Precision", "Recall", "FD_DINOv2"]
    row = normalise_anchor({"label": "x", "FD_DINOv2": 1, "Inception Score": 2, "sFID": 3, "Rec": 4})
    assert (row["fd_dinov2"], row["inception_score"], row["sfid"], row["recall"]) == (1.0, 2.0, 3.0, 4.0)


def test_random_weight_runs_are_marked(tmp_path):
    root = tmp_path / "exp"
    write_run(root, "a", metrics(1.0, 1.0), {"pag_scale": 1.0}, random_weights=True)
    write_run(root, "b", metrics(2.0, 1.0), {"pag_scale": 2.0}, random_weights=False)
    table = make_table([root / "a", root / "b" / "eval.json"], tmp_path / "out", experiment="dry run", plots=False)
    md = (tmp_path / "out" / "dry_run.md").read_text()
    assert "| ours [RANDOM-WEIGHTS] |" in md and "| ours |" in md
    assert "RANDOM-WEIGHTS: rows so marked" in md
    assert "RANDOM-WEIGHTS" in (tmp_path / "out" / "dry_run.tex").read_text()
    assert table["dry run"]["files"] == [str(tmp_path / "out" / f"dry_run.{e}") for e in ("md", "csv", "tex")]
    # Columns without any value are left out.
    assert "perturbation" not in md.splitlines()[2]


def test_format_lines_marks_random_weights():
    result = dict(metrics(3.5, 200.0, 0.8265, 0.5309, 6.25), random_weights=False)
    assert format_lines(result) == ["Inception Score: 200.0", "FID: 3.5", "sFID: 6.25", "Precision: 0.8265",
                                    "Recall: 0.5309"]
    result["random_weights"] = True
    assert all(ln.endswith("[RANDOM-WEIGHTS]") for ln in format_lines(result))


def test_anchor_normalisation_and_errors(tmp_path):
    row = normalise_anchor({"name": "x", "Inception Score": 10, "fid": "3.5", "prec": 0.5})
    assert (row["run"], row["inception_score"], row["fid"], row["precision"], row["recall"]) == ("x", 10.0, 3.5,
                                                                                                  0.5, None)
    with pytest.raises(ValueError, match="none of the metrics"):
        normalise_anchor({"label": "nothing"})
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"name": "e", "anchors": ANCHORS}))
    assert load_anchors(exp) == ANCHORS
    exp.write_text(yaml.safe_dump({"name": "e"}))
    with pytest.raises(ValueError, match="no 'anchors:'"):
        load_anchors(exp)


def test_bad_runs(tmp_path):
    with pytest.raises(FileNotFoundError):
        make_table([tmp_path / "missing"], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no evaluator result"):
        make_table([empty], tmp_path / "out")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fid": 1.0}))
    with pytest.raises(ValueError, match="not an evaluator result"):
        make_table([bad], tmp_path / "out")
    nan_like = tmp_path / "r" / "eval.json"
    nan_like.parent.mkdir()
    nan_like.write_text(json.dumps(dict(metrics(1.0, 2.0), fid="oops", format=RESULT_FORMAT)))
    with pytest.raises(ValueError, match="fid is not a number"):
        make_table([nan_like], tmp_path / "out")


def test_make_table_script(runs, tmp_path, capsys):
    import importlib.util

    root, _ = runs
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump({"anchors": ANCHORS[:1]}))
    spec = importlib.util.spec_from_file_location("make_table_script", os.path.join(REPO, "scripts", "make_table.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main([str(root), "--out", str(tmp_path / "o"), "--anchors", str(exp), "--no-plots",
                        "--group-by", "pag_scale,sampler"])
    assert code == 0
    printed = capsys.readouterr().out
    header = "| run | pag_scale | sampler | FID | sFID | IS | Precision | Recall | N | source |"
    assert printed.splitlines()[2] == header
    assert "ADM baseline" in printed
    assert not list((tmp_path / "o").glob("*.png"))
    assert script.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2


# ---------------------------------------------------------------------------------------------------------------
# make check-evaluator


def test_regression_reports_missing_inputs(tmp_path, capsys):
    code = regression.main(["--ref", str(tmp_path / "r.npz"), "--sample", str(tmp_path / "s.npz"),
                            "--inception-weights", str(tmp_path / "w.pth")])
    assert code == 2
    out = capsys.readouterr().out
    assert sum(ln.startswith("missing ") for ln in out.splitlines()) == 3
    for needle in ("make download-refs", "make download-inception", "VIRTUAL_imagenet256_labeled.npz",
                   "admnet_guided_upsampled_imagenet256.npz", "weights-inception-2015-12-05-6726825d.pth",
                   "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/",
                   "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"):
        assert needle in out


def test_regression_comparison():
    exact = regression.compare(regression.UPSTREAM)
    assert all(row[-1] for row in exact) and all(row[3] == 0 for row in exact)
    shifted = dict(regression.UPSTREAM, fid=regression.UPSTREAM["fid"] + 0.01)
    rows = {row[0]: row for row in regression.compare(shifted)}
    assert not rows["fid"][-1] and rows["recall"][-1]
    assert "OUTSIDE" in regression.format_comparison(rows.values())


@pytest.mark.skipif(not os.path.isfile(ANCHORS_MD), reason="shared reference data not present")
def test_regression_constants_match_anchors():
    text = open(ANCHORS_MD).read()
    section = text[text.index("## ADM evaluator regression pair"):]
    header, _, values = [ln for ln in section.splitlines() if ln.startswith("|")][:3]
    names = [c.strip() for c in header.strip("|").split("|")]
    numbers = [float(c) for c in values.strip("|").split("|")]
    keys = {"Inception Score": "inception_score", "FID": "fid", "sFID": "sfid", "Precision": "precision",
            "Recall": "recall"}
    assert {keys[n]: v for n, v in zip(names, numbers)} == regression.UPSTREAM
    deltas = re.search(r"within about ([\d.]+) FID, ([\d.]+) sFID,\s+([\d.]+) IS, ([\d.]+) Precision and ([\d.]+) "
                       r"Recall", section)
    assert deltas, "the expected deltas sentence in anchors.md changed"
    expected = dict(zip(("fid", "sfid", "inception_score", "precision", "recall"), map(float, deltas.groups())))
    assert expected == regression.EXPECTED_DELTA


def test_best_fid_row_is_marked_with_a_note(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "tables"
    table = make_table([root], out, anchors=ANCHORS, plots=False)["pag_uncond"]
    # s3 (FID 15.5) is the lowest of ours; the published CG anchor (2.97) is not one of ours
    assert [r["run"] for r in table["rows"] if r.get("best_fid")] == ["s3"]
    md = (out / "pag_uncond.md").read_text()
    assert "| s3 | 3 | input_blocks.14.1, middle_block.1 | identity | DDPM-250 | **15.50** |" in md
    assert md.count("**") == 2 and "Bold FID: the lowest FID of our rows" in md
    rows = list(csv.DictReader(io.StringIO((out / "pag_uncond.csv").read_text())))
    assert [r["run"] for r in rows if r["best_fid"] == "1"] == ["s3"]
    tex = (out / "pag_uncond.tex").read_text()
    assert r"\textbf{15.50}" in tex and tex.count(r"\textbf") == 1
    # A table with one FID has nothing to compare: no mark, no note.
    single = tmp_path / "single"
    write_run(single, "only", metrics(9.0, 1.0), {"pag_scale": 1.0})
    make_table([single], tmp_path / "out1", plots=False)
    md = (tmp_path / "out1" / "single.md").read_text()
    assert "**" not in md and "Bold FID" not in md
