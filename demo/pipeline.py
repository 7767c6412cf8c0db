"""The CPU demo's bookends around the sweep (``make demo`` runs: prepare, the sweep under mpiexec, finish).

    python scripts/demo.py prepare   # the reference batch: held-out images of the demo's data set
    python scripts/demo.py finish    # results/demo/table.md (printed), plot.png, grid.png

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
from sampling.images import save_side_by_side

from .data import make_dataset

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "configs" / "demo.yaml"
REFERENCE_SEED = 1_000_003  # disjoint from the training data's seed
# grid.png: the first GRID_COUNT samples of these two cells (the same seeds, so the same initial noise).
BASELINE_CELL, GUIDED_CELL, GRID_COUNT = "method-baseline", "method-pag_s2", 32


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


def finish(config):
    out_dir = ROOT / config["out_dir"]
    name = config.get("name", out_dir.name)
    table_dir = out_dir / "table"
    table = table_dir / f"{name}.md"
    if not table.exists():
        raise SystemExit(f"{table} is missing: the sweep did not finish (make demo)")
    shutil.copyfile(table, out_dir / "table.md")
    shutil.copyfile(table_dir / f"{name}_fid_is.png", out_dir / "plot.png")
    baseline = _cell_samples(out_dir, BASELINE_CELL)[:GRID_COUNT]
    guided = _cell_samples(out_dir, GUIDED_CELL)[:GRID_COUNT]
    save_side_by_side(baseline, guided, out_dir / "grid.png")
    print(table.read_text())
    print(f"wrote {out_dir}/table.md, plot.png (metrics against the PAG scale) and grid.png "
          f"(the same seeds: {BASELINE_CELL} left, {GUIDED_CELL} right)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "finish"])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--num_reference", type=int, default=2000)
    args = parser.parse_args(argv)
    config = load_demo_config(args.config)
    if args.step == "prepare":
        prepare(config, args.num_reference)
    else:
        finish(config)
    return 0
