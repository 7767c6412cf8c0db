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
