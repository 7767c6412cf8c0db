"""The cost table (benchmarks/cost.py, make bench-cost): FLOPs counted on the meta device, attention included,
no memory used, and the table of docs/reproduction.md is what the script prints."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks import cost
from processes import ROOT, clean_env

# Run in a subprocess: the script's output, its wall time, and how much its peak resident memory grows while it
# counts (after its imports). The full-width U-Net's float32 weights alone are over 2 GB.
MEASURE = """
import resource, sys, time
sys.argv = ["bench_cost.py"] + sys.argv[1:]
from benchmarks.cost import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
main()
print(f"seconds={time.perf_counter() - start:.2f} grew_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}",
      file=sys.stderr)
"""


def test_the_readme_table_is_what_the_script_prints_without_memory_in_seconds():
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    readme = (ROOT / "docs" / "reproduction.md").read_text()
    printed = proc.stdout.strip()
    assert printed.count("\n| 256x256_diffusion") == 12
    assert printed in readme  # regenerate: python scripts/bench_cost.py, paste over docs/reproduction.md's block
    stats = dict(item.split("=") for item in proc.stderr.strip().splitlines()[-1].split())
    assert float(stats["seconds"]) < 30 and wall < 60, (stats, wall)
    assert int(stats["grew_kib"]) < 512 * 1024, stats  # no model was materialised


def test_the_counts_and_their_attention():
    model, flags = cost.meta_model("256x256_diffusion_uncond")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    counted, by_hand = cost.attention_check(model, flags)
    # 16 blocks: 5 at 32x32 (512 channels), 5 at 16x16 and 6 at 8x8 (1024 channels).
    assert by_hand == 4 * (5 * 1024**2 * 512 + 5 * 256**2 * 1024 + 6 * 64**2 * 1024) == 12_180_258_816
    assert counted == by_hand
    per_step = cost.model_step_flops("256x256_diffusion_uncond")
    unguided, engine, two_pass = (per_step[g] for g in cost.GUIDANCE)
    assert unguided == pytest.approx(2.2397e12, rel=1e-4)  # not the 1.1 TFLOP of multiply-adds counted once
    assert engine / unguided == pytest.approx(1.752, abs=1e-3)
    # Two forwards, less the attention matmuls identity skips in the perturbed one.
    skipped = 4 * (256**2 * 1024 + 3 * 64**2 * 1024)
    assert two_pass == 2 * unguided - skipped
    assert cost.model_step_flops("256x256_diffusion") == per_step  # the label embedding is a lookup


def test_hours_follow_the_peak_fraction_and_the_steps():
    rows = {(r["model"], r["sampler"], r["guidance"]): r for r in cost.cost_rows(0.4)}
    half = {(r["model"], r["sampler"], r["guidance"]): r for r in cost.cost_rows(0.2)}
    row = rows[("256x256_diffusion_uncond", "DDPM-250", "unguided")]
    assert row["pflop_per_run"] == pytest.approx(row["tflop_per_step"] * 250 * 50_000 / 1e3)
    assert row["hours"]["A100"] == pytest.approx(row["pflop_per_run"] * 1e15 / (0.4 * 312e12) / 3600)
    assert row["hours"]["H100 SXM"] == pytest.approx(row["pflop_per_run"] * 1e15 / (0.4 * 989e12) / 3600)
    assert half[row["model"], row["sampler"], row["guidance"]]["hours"]["A100"] == pytest.approx(
        2 * row["hours"]["A100"])
    ddim = rows[("256x256_diffusion_uncond", "DDIM-25", "unguided")]
    assert ddim["pflop_per_run"] == pytest.approx(row["pflop_per_run"] / 10)
    assert "at 20% of the dense fp16 peak" in cost.cost_markdown(0.2)
    with pytest.raises(ValueError):
        cost.cost_rows(0)
    with pytest.raises(SystemExit):
        cost.main(["--peak-fraction", "1.5"])


def test_the_layers_are_the_experiments():
    for path in sorted((ROOT / "configs" / "experiments").glob("table1_*.yaml")):
        grid = yaml.safe_load(path.read_text())["grid"]["method"]
        (pag_cell,) = [cell for cell in grid if cell["name"] == "pag"]
        assert tuple(pag_cell["pag_layers"].split(",")) == cost.PAPER_LAYERS, path
        assert pag_cell["pag_scale"] == cost.PAG_SCALE
