"""Runs started before a change resume after it: a run record written by the code before the layering change
(tests/data/run_record_before_layering.yaml, a 12-sample demo-model run killed after its first shard) is
accepted by today's planning, with the finished shard counted and the rest left to sample."""

from pathlib import Path

import numpy as np
import yaml

from adm_common.npz import NpzWriter
from sampling import cli, prepare

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "tests" / "data" / "run_record_before_layering.yaml"


def test_record_of_the_previous_layout_resumes(tmp_path):
    record = yaml.safe_load(RECORD.read_text())
    checkpoint = ROOT / "checkpoints" / "demo" / "adm_demo.pt"
    record["settings"]["model_path"] = str(checkpoint)  # where this clone keeps the demo checkpoint
    out_dir = tmp_path / "run"
    (out_dir / "shards").mkdir(parents=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(record))
    with NpzWriter(out_dir / "shards" / "shard_000000.npz") as w:
        w.write("arr_0", np.zeros((4, 32, 32, 3), np.uint8))
        w.write("arr_1", np.zeros(4, np.int64))
        w.write("sample_range", np.array([0, 4], np.int64))
    settings = cli.resolve_cli([
        "--model", str(ROOT / "checkpoints" / "demo" / "adm_demo.yaml"), "--model_path", str(checkpoint),
        "--num_samples", "12", "--shard_size", "4", "--batch_size", "4", "--timestep_respacing", "ddim4",
        "--use_ddim", "True", "--device", "cpu", "--num_classes", "10", "--pag_scale", "2",
        "--pag_layers", "middle_block.1", "--out_dir", str(out_dir)])
    plan = prepare(settings)
    assert (plan.done_images, plan.remaining, plan.complete) == (4, [1, 2], False)
