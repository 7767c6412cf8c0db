"""The CPU demo's bookends around the sweep (``make demo`` runs: prepare, the sweep under mpiexec, finish).

    python scripts/demo.py prepare   # the reference batch: held-out images of the demo's data set
    python scripts/demo.py finish    # results/demo/table.md (printed), plot.png, grid.png
    python scripts/demo.py finish --config configs/compare_demo.yaml --grid rows   # ``make compare-demo``:
                                     # one row of the same seeds per cell (every method of the comparison)

Everything between is the real pipeline: ``scripts/sweep.py configs/demo.yaml`` samples every
cell under mpiexec, evaluates it (with the demo's feature network instead of Inception) and writes the
table, exactly as the reproduction targets do.
"""

import argparse
import io
import shutil
from pathlib import Path

import numpy as np

from adm_common.files import atomic_write_bytes
from sampling.config_files import read_yaml_mapping
from sampling.images import image_grid, save_png, save_side_by_side
from sampling.sweep import expand, load_sweep

from .data import make_dataset

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "demo.yaml"
REFERENCE_SEED = 1_000_003  # disjoint from the training data's seed
# grid.png, --grid pair: the first GRID_COUNT samples of these two cells (the same seeds, so the same initial noise);
# --grid rows: the first ROW_COUNT samples of every cell, one row each, labelled with the cell's name.
BASELINE_CELL, GUIDED_CELL, GRID_COUNT, ROW_COUNT = "method-baseline", "method-pag_s2", 32, 12
GRID_CHOICES = ("pair", "rows")


def load_demo_config(path=CONFIG):
    return read_yaml_mapping(path, "demo config")


def prepare(config, num_reference):
    """Write the reference batch (``ref_batch`` of the demo config) unless it is already there."""
    path = ROOT / config["ref_batch"]
    if path.exists():
        with np.load(path) as npz:
            if npz["arr_0"].shape[0] == num_reference:
                print(f"reference batch {path} exists ({num_reference} images)")
                return path
        raise SystemExit(f"{path} holds another number of images than {num_reference}: remove it first")
    images, labels = make_dataset(num_reference, seed=REFERENCE_SEED)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=labels)
    atomic_write_bytes(path, buf.getvalue())
    print(f"wrote reference batch {path}: {num_reference} held-out images of the data set")
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


def finish(config, config_path=CONFIG, grid="pair"):
    """Copy the sweep's table (and its plot, when the table code drew one) next to grid.png and print it.
    ``grid``: "pair" (the demo's baseline beside PAG s = 2) or "rows" (every cell, one row, the same seeds)."""
    out_dir = ROOT / config["out_dir"]
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
        baseline = _cell_samples(out_dir, BASELINE_CELL)[:GRID_COUNT]
        guided = _cell_samples(out_dir, GUIDED_CELL)[:GRID_COUNT]
        save_side_by_side(baseline, guided, out_dir / "grid.png")
        written.append(f"grid.png (the same seeds: {BASELINE_CELL} left, {GUIDED_CELL} right)")
    else:
        cells = [cell.name for cell in expand(load_sweep(str(config_path)))]
        save_labelled_rows([(cell, _cell_samples(out_dir, cell)[:ROW_COUNT]) for cell in cells],
                           out_dir / "grid.png")
        written.append(f"grid.png (the first {ROW_COUNT} samples, the same seeds, of each cell: "
                       f"{', '.join(cells)}, top to bottom)")
    print(table.read_text())
    print(f"wrote {out_dir}/" + ", ".join(written))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--num_reference", type=int, default=2000)
    parser.add_argument("--grid", choices=GRID_CHOICES, default="pair",
                        help="finish's grid.png: the demo's baseline beside PAG s = 2 (pair) or every cell (rows)")
    args = parser.parse_args(argv)
    config = load_demo_config(args.config)
    if args.step == "prepare":
        prepare(config, args.num_reference)
    else:
        finish(config, args.config, args.grid)
    return 0
