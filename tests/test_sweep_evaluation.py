"""A sweep cell's eval.json: written once per evaluation, by the evaluator's one writer (issue 20, item 4: it was
written twice, by evaluate() and again by the sweep, with different JSON options)."""

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from evaluations.evaluator import evaluate
from sampling import sweep_evaluation

ROOT = Path(__file__).resolve().parents[1]
DEMO_FEATURES = ROOT / "checkpoints" / "demo" / "features_demo.pt"


def image_batch(path, seed, n=8):
    low = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3))
    np.savez(path, np.repeat(np.repeat(low, 8, axis=1), 8, axis=2).astype(np.uint8))
    return path


def test_eval_json_is_written_once_by_the_one_writer(tmp_path, monkeypatch):
    ref = image_batch(tmp_path / "ref.npz", 0)
    cell_dir = tmp_path / "cell"
    cell_dir.mkdir()
    image_batch(cell_dir / "samples_8x32x32x3.npz", 1)
    cell = SimpleNamespace(name="cell", out_dir=str(cell_dir), settings=SimpleNamespace(
        sampling=SimpleNamespace(num_samples=8), model=SimpleNamespace(image_size=32)))
    sweep = SimpleNamespace(ref_batch=str(ref), evaluation={
        "feature_net": str(DEMO_FEATURES), "min_samples": 0, "metrics": "fid,pr", "progress": False, "device": "cpu",
        "cache_dir": str(tmp_path / "cache")})
    eval_json = cell_dir / "eval.json"
    writes = []
    real_replace = os.replace

    def counting_replace(src, dst, *args, **kwargs):  # every atomic write ends in a rename onto its path
        if os.fspath(dst) == str(eval_json):
            writes.append(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", counting_replace)
    [result] = sweep_evaluation._evaluate_cells([cell], sweep, evaluate)
    assert len(writes) == 1
    recorded = json.loads(eval_json.read_text())
    assert recorded["fid"] == result["fid"] and recorded["marker"] == "DEMO-FEATURES"
    samples = (cell_dir / "samples_8x32x32x3.npz").read_bytes()
    assert recorded["sweep_inputs"]["sample_sha256"] == hashlib.sha256(samples).hexdigest()
    # The one writer's options: indented, keys sorted.
    assert eval_json.read_text() == json.dumps(recorded, indent=2, sort_keys=True) + "\n"

    # Nothing changed: not evaluated (nor written) again.
    assert sweep_evaluation._evaluate_cells([cell], sweep, evaluate)[0]["fid"] == result["fid"]
    assert len(writes) == 1
    # Evaluated on another device type (or by another evaluator format): evaluated again, not reused.
    recorded["sweep_inputs"]["numerics"] = recorded["sweep_inputs"]["numerics"].replace("cpu/", "cuda/")
    eval_json.write_text(json.dumps(recorded))
    assert sweep_evaluation._evaluate_cells([cell], sweep, evaluate)[0]["fid"] == result["fid"]
    assert len(writes) == 2 and json.loads(eval_json.read_text())["sweep_inputs"]["numerics"].startswith("cpu/")
