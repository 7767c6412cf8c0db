import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("PAG_REFERENCE_DIR", ROOT.parent / "shared" / "reference"))
sys.path.insert(0, str(ROOT))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def adm_checkpoints():
    path = REFERENCE_DIR / "adm_checkpoints.json"
    if not path.exists():
        pytest.fail(f"reference data missing: {path} (set PAG_REFERENCE_DIR)")
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def pag_reference():
    path = REFERENCE_DIR / "pag_reference_small.pt"
    if not path.exists():
        pytest.fail(f"reference data missing: {path} (set PAG_REFERENCE_DIR)")
    return torch.load(path, weights_only=True)


# The tiny class-conditional ADM the run, sweep and symlink tests sample from (random weights, every layer counts).
TINY_MODEL_FLAGS = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                        attention_resolutions="16,8", num_head_channels=16, class_cond=True, learn_sigma=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of :data:`TINY_MODEL_FLAGS` (with use_scale_shift_norm) written once per test module."""
    from guided_diffusion.script_util import create_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.manual_seed(1)
    model = create_model(**TINY_MODEL_FLAGS, use_scale_shift_norm=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.state_dict(), path)
    return path
