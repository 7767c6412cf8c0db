"""The evaluator under torchrun / srun splits the feature extraction over the processes (one launcher
detection, adm_common.launch), instead of every process computing the whole thing."""

import json
import sys

import numpy as np

from processes import clean_env, free_port, run_together

WORKER = r"""
import json, sys
import numpy as np
from evaluations.reference import detect_distributed, extract_features

class MeanColour:  # a stand-in extractor: the mean colour of each image, and how many images it saw
    seen = 0
    def __call__(self, images):
        MeanColour.seen += len(images)
        pool = images.reshape(len(images), -1, 3).mean(axis=1).astype(np.float32)
        return {"pool": pool, "logits": pool, "spatial": pool}

dist = detect_distributed()
feats = extract_features(sys.argv[1], MeanColour(), batch_size=4, dist=dist)
dist.close()  # destroys the group detect_distributed made
print(json.dumps({"kind": type(dist).__name__, "rank": dist.rank, "world": dist.world_size,
                  "seen": MeanColour.seen, "rows": None if feats is None else feats["pool"].tolist()}))
"""


def _launch(npz, env_for_rank):
    results = run_together([[sys.executable, "-c", WORKER, str(npz)]] * 2, [clean_env(**env_for_rank(r))
                                                                          for r in range(2)], 180)
    out = []
    for code, text in results:
        assert code == 0, text
        out.append(json.loads([line for line in text.splitlines() if line.startswith("{")][-1]))
    return out


def _check(results, images):
    assert [r["kind"] for r in results] == ["TorchDistributed", "TorchDistributed"]
    assert [r["seen"] for r in results] == [5, 4]  # each process extracted its own slice only
    expected = images.reshape(len(images), -1, 3).mean(axis=1)
    np.testing.assert_allclose(np.array(results[0]["rows"]), expected, rtol=1e-6)
    assert results[1]["rows"] is None


def test_torchrun_and_srun_split_the_extraction(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (9, 8, 8, 3), dtype=np.uint8)
    npz = tmp_path / "batch.npz"
    np.savez(npz, arr_0=images)
    port = free_port()
    _check(_launch(npz, lambda r: dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))), images)
    port = free_port()
    _check(_launch(npz, lambda r: dict(SLURM_PROCID=str(r), SLURM_STEP_NUM_TASKS="2", SLURM_STEP_ID="0",
                                       SLURM_LOCALID=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))), images)
