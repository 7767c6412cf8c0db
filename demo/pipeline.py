"""The CPU demo's bookends around the sweep (``make demo`` runs: prepare, the sweep under mpiexec, finish).

    python scripts/demo.py prepare   # the reference batch: held-out images of the model's data set
    python scripts/demo.py finish    # results/demo/table.md (printed), plot.png, grid.png, claims.json
    python scripts/demo.py finish --config configs/compare_demo.yaml --grid rows   # ``make compare-demo``:
                                     # one row of the same seeds per cell (every method of the comparison)

Everything between is the real pipeline: ``scripts/sweep.py configs/demo.yaml`` samples every
cell under mpiexec, evaluates it (with the demo's feature network instead of Inception) and writes the
table, exactly as the reproduction targets do.
"""

import argparse
import csv
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from adm_common.files import atomic_open, atomic_write_text
from adm_common.yaml_files import read_yaml
from evaluations.uncertainty import seed_run_name
from sampling.images import image_grid, save_png, save_side_by_side
from sampling.model_configs import load_model_config
from sampling.sweep import expand, load_sweep

from .data import DATASETS, make_dataset

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "demo.yaml"
REFERENCE_SEED = 1_000_003  # disjoint from the training data's seed
# grid.png, --grid pair: the first GRID_COUNT samples of these two cells (the same seeds, so the same initial noise);
# --grid rows: the first ROW_COUNT samples of every cell, one row each, labelled with the cell's name.
BASELINE_CELL, GUIDED_CELL, GRID_COUNT, ROW_COUNT = "method-baseline", "method-pag_s2", 32, 12


def model_dataset(config):
    """The demo data set (a key of demo.data.DATASETS) the config's model was trained on, from its name."""
    name = load_model_config(ROOT / config["base"]["model"])["name"]
    found = [dataset for dataset, spec in DATASETS.items() if spec.model == name]
    if not found:
        raise SystemExit(f"{config['base']['model']}: model {name!r} is none of the demo's models "
                         f"({', '.join(spec.model for spec in DATASETS.values())})")
    return found[0]


def prepare(config, num_reference):
    """Write the reference batch (``ref_batch`` of the demo config: held-out images of the data set the model
    was trained on) unless it is already there."""
    path = ROOT / config["ref_batch"]
    dataset = model_dataset(config)
    images, labels = make_dataset(num_reference, seed=REFERENCE_SEED, kind=dataset)
    if path.exists():
        with np.load(path) as npz:
            if np.array_equal(npz["arr_0"], images):
                print(f"reference batch {path} exists ({num_reference} images of the {dataset} data set)")
                return path
        raise SystemExit(f"{path} holds other images than {num_reference} held-out images of the {dataset} data "
                         "set (another demo's reference?): remove it first")
    with atomic_open(path) as f:  # creates the directory
        np.savez(f, arr_0=images, arr_1=labels)
    print(f"wrote reference batch {path}: {num_reference} held-out images of the {dataset} data set")
    return path


def _cell_samples(out_dir, cell):
    found = sorted((out_dir / cell).glob("samples_*x3.npz"))
    if not found:
        raise SystemExit(f"no samples in {out_dir / cell}: run the sweep first (make demo)")
    with np.load(found[0]) as npz:
        return npz["arr_0"]


def save_labelled_rows(rows, path, zoom=3, label_width=120):
    """One row of images per ``(label, images)`` pair, the label written on the left (white background),
    enlarged ``zoom`` times without smoothing; written atomically as PNG."""
    from PIL import Image, ImageDraw

    strips = [image_grid(images, len(images), pad=2, pad_value=255) for _, images in rows]
    height, width = strips[0].shape[0] * zoom, max(s.shape[1] for s in strips) * zoom
    canvas = Image.new("RGB", (label_width + width, height * len(strips)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, ((label, _), strip) in enumerate(zip(rows, strips)):
        picture = Image.fromarray(strip).resize((strip.shape[1] * zoom, strip.shape[0] * zoom), Image.NEAREST)
        canvas.paste(picture, (label_width, index * height))
        draw.text((4, index * height + height // 2 - 6), label, fill="black")
    save_png(np.asarray(canvas), path)


CLAIM_SIGMAS = 3  # PAG's effect on FID is called resolved beyond this many combined standard deviations


def _number(text):
    return float(text) if text not in ("", None) else None


def demo_claims(rows):
    """What the demo can claim from its table's rows (the table CSV's, over seeds: mean and ``<metric>_std``):
    the baseline's FID, the PAG scale with the lowest mean FID and its FID, whether their difference exceeds
    ``CLAIM_SIGMAS`` combined standard deviations (sqrt(std_b^2 + std_p^2)), and every scale's FID, precision and
    recall. None when the table has no baseline row (pag_scale 0), no PAG row or no spread over seeds."""
    by_scale = [{"pag_scale": _number(row["pag_scale"]), "seeds": int(_number(row.get("seeds")) or 1),
                 **{key: _number(row.get(key)) for metric in ("fid", "precision", "recall")
                    for key in (metric, f"{metric}_std")}}
                for row in rows if row.get("source", "ours") == "ours" and _number(row.get("pag_scale")) is not None]
    baseline = [e for e in by_scale if e["pag_scale"] == 0]
    guided = [e for e in by_scale if e["pag_scale"] > 0 and e["fid"] is not None]
    if len(baseline) != 1 or not guided or any(e["fid_std"] is None for e in baseline + guided):
        return None
    base, best = baseline[0], min(guided, key=lambda e: e["fid"])
    combined = math.hypot(base["fid_std"], best["fid_std"])
    gain = base["fid"] - best["fid"]
    return {
        "baseline_fid_mean": base["fid"], "baseline_fid_std": base["fid_std"],
        "best_pag_scale": best["pag_scale"], "best_pag_fid_mean": best["fid"], "best_pag_fid_std": best["fid_std"],
        "fid_gain": gain, "combined_std": combined, "sigmas": CLAIM_SIGMAS,
        "resolved": bool(gain > CLAIM_SIGMAS * combined), "seeds": base["seeds"],
        "by_scale": sorted(by_scale, key=lambda e: e["pag_scale"]),
    }


def claims_text(claims):
    """The demo's claim in words, from :func:`demo_claims` (every number measured, none typed in)."""
    verdict = "resolved" if claims["resolved"] else "NOT resolved"
    lines = [
        f"FID over {claims['seeds']} seeds: baseline {claims['baseline_fid_mean']:.2f} ± "
        f"{claims['baseline_fid_std']:.2f}; best PAG scale s = {claims['best_pag_scale']:g}: "
        f"{claims['best_pag_fid_mean']:.2f} ± {claims['best_pag_fid_std']:.2f}. Gain {claims['fid_gain']:.2f} against "
        f"{claims['sigmas']} combined std = {claims['sigmas'] * claims['combined_std']:.2f}: {verdict}.",
    ]
    for metric in ("precision", "recall"):
        lines.append(f"{metric} by s: " + ", ".join(
            f"{e['pag_scale']:g}: {e[metric]:.3f}"
            + (f" ± {e[metric + '_std']:.3f}" if e[metric + "_std"] is not None else "")
            for e in claims["by_scale"] if e[metric] is not None))
    return "\n".join(lines)


def write_claims(table_csv, path):
    """``claims.json`` from the sweep's table CSV (see :func:`demo_claims`); None, and an earlier ``claims.json``
    removed, when the table has nothing to claim (a claim of another run is never left standing)."""
    rows = []
    if os.path.exists(table_csv):  # a table without its CSV (none written) claims nothing
        with open(table_csv, newline="") as f:
            rows = list(csv.DictReader(f))
    claims = demo_claims(rows)
    if claims is None:
        if os.path.lexists(path):
            os.remove(path)
        return None
    table = os.path.relpath(table_csv, ROOT) if Path(table_csv).resolve().is_relative_to(ROOT) else str(table_csv)
    atomic_write_text(path, json.dumps(dict(claims, table=table), indent=2) + "\n")
    return claims


def finish(config, config_path=CONFIG, grid="pair"):
    """Copy the sweep's table (and its plot, when the table code drew one) next to grid.png and print it, and
    with seeds the demo's claims (claims.json). ``grid``: "pair" (the demo's baseline beside PAG s = 2, their
    first seed) or "rows" (every cell, one row, the same seeds)."""
    out_dir = ROOT / config["out_dir"]
    sweep = load_sweep(str(config_path))
    name = config.get("name", out_dir.name)
    table_dir = out_dir / "table"
    table = table_dir / f"{name}.md"
    if not table.exists():
        raise SystemExit(f"{table} is missing: the sweep did not finish (run its make target)")
    shutil.copyfile(table, out_dir / "table.md")
    written = ["table.md"]
    plot = table_dir / f"{name}_fid_is.png"
    if plot.exists():  # only sweeps whose rows have a numeric guidance scale get one
        shutil.copyfile(plot, out_dir / "plot.png")
        written.append("plot.png (metrics against the PAG scale)")
    if grid == "pair":
        left, right = ((cell if sweep.seeds is None else seed_run_name(cell, sweep.seeds[0]))
                       for cell in (BASELINE_CELL, GUIDED_CELL))
        save_side_by_side(_cell_samples(out_dir, left)[:GRID_COUNT], _cell_samples(out_dir, right)[:GRID_COUNT],
                          out_dir / "grid.png")
        written.append(f"grid.png (the same seeds: {left} left, {right} right)")
    else:
        cells = [cell.name for cell in expand(sweep)]
        save_labelled_rows([(cell, _cell_samples(out_dir, cell)[:ROW_COUNT]) for cell in cells],
                           out_dir / "grid.png")
        written.append(f"grid.png (the first {ROW_COUNT} samples, the same seeds, of each cell: "
                       f"{', '.join(cells)}, top to bottom)")
    print(table.read_text())
    claims = write_claims(table_dir / f"{name}.csv", out_dir / "claims.json")
    if claims:
        print(claims_text(claims))
        written.append("claims.json")
    elif sweep.seeds:
        print("no claim: the table needs one baseline row (pag_scale 0) and PAG rows, each with a std over seeds")
    print(f"wrote {out_dir}/" + ", ".join(written))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--num_reference", type=int, default=2000)
    parser.add_argument("--grid", choices=("pair", "rows"), default="pair",
                        help="finish's grid.png: the demo's baseline beside PAG s = 2 (pair) or every cell (rows)")
    args = parser.parse_args(argv)
    config = read_yaml(args.config, "demo config")
    if args.step == "prepare":
        prepare(config, args.num_reference)
    else:
        finish(config, args.config, args.grid)
    return 0
