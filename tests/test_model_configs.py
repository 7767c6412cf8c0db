"""configs/models/*.yaml and configs/refs.yaml against ../shared/reference (flags, URLs, pairings)."""

import json
import os
import urllib.parse
from pathlib import Path

import pytest
import yaml

from sampling import downloads as download

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("PAG_REFERENCE_DIR", ROOT.parent / "shared" / "reference")) / "adm_checkpoints.json"
BASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
REF_BASE_URL = BASE_URL + "ref_batches/"

CHECKPOINTS = json.loads(REFERENCE.read_text())
# anchors.md, "Classifier scales used upstream"
CLASSIFIER_PAIRS = {
    "64x64_diffusion": ("64x64_classifier", 1.0),
    "128x128_diffusion": ("128x128_classifier", 0.5),
    "256x256_diffusion": ("256x256_classifier", 1.0),
    "256x256_diffusion_uncond": ("256x256_classifier", 10.0),
    "512x512_diffusion": ("512x512_classifier", 4.0),
}


def load(name):
    return yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())


def test_one_config_per_official_checkpoint():
    names = {p.stem for p in (ROOT / "configs" / "models").glob("*.yaml")}
    assert names == set(CHECKPOINTS)
    assert len(names) == 12


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_config_matches_reference(name):
    cfg = load(name)
    assert set(cfg) <= {"name", "kind", "url", "file", "flags", "classifier"}
    assert cfg["name"] == name
    # Same keys, values and types (True is not "True", 0.1 is not "0.1").
    assert cfg["flags"] == CHECKPOINTS[name]["flags"]
    assert {k: type(v) for k, v in cfg["flags"].items()} == {
        k: type(v) for k, v in CHECKPOINTS[name]["flags"].items()}
    expected_kind = ("classifier" if name.endswith("_classifier")
                     else "upsampler" if name.endswith("_upsampler") else "diffusion")
    assert cfg["kind"] == expected_kind
    assert cfg["file"] == f"{name}.pt"
    assert cfg["url"] == BASE_URL + cfg["file"]
    url = urllib.parse.urlparse(cfg["url"])
    assert (url.scheme, url.netloc) == ("https", "openaipublic.blob.core.windows.net")
    assert not url.query and not url.fragment and " " not in cfg["url"]


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_classifier_pairing(name):
    cfg = load(name)
    if name not in CLASSIFIER_PAIRS:
        assert "classifier" not in cfg
        return
    pair = cfg["classifier"]
    assert (pair["name"], pair["scale"]) == CLASSIFIER_PAIRS[name]
    classifier = load(pair["name"])
    assert classifier["kind"] == "classifier"
    assert classifier["flags"]["image_size"] == cfg["flags"]["image_size"]


def test_refs_config():
    cfg = yaml.safe_load((ROOT / "configs" / "refs.yaml").read_text())
    refs = cfg["refs"]
    for name in ("imagenet64", "imagenet128", "imagenet256", "imagenet512", "lsun_bedroom"):
        assert name in refs
    assert refs["imagenet256"]["url"] == REF_BASE_URL + "imagenet/256/VIRTUAL_imagenet256_labeled.npz"
    for name, entry in refs.items():
        url = urllib.parse.urlparse(entry["url"])
        assert (url.scheme, url.netloc) == ("https", "openaipublic.blob.core.windows.net"), name
        assert entry["url"].startswith(REF_BASE_URL), name
        assert entry["url"].rsplit("/", 1)[1] == entry["file"], name
        assert entry["file"].endswith(".npz"), name
        assert entry.get("kind", "reference") in ("reference", "samples"), name
    inception = cfg["inception"]
    assert inception["file"] == "weights-inception-2015-12-05-6726825d.pth"
    assert inception["url"] == ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                                "weights-inception-2015-12-05-6726825d.pth")


def test_download_verification_uses_the_reference_architectures():
    """The shapes download.py checks a checkpoint against are exactly those of the official files."""
    items = download.load_model_items()
    for name, entry in CHECKPOINTS.items():
        expected = {k: tuple(v) for k, v in entry["state_dict"].items()}
        assert download.expected_shapes(items[name]) == expected, name


def test_unknown_flag_in_config_is_rejected():
    item = download.Item("models", "x", "diffusion", "u", "x.pt", {"image_size": 64, "num_chanels": 128})
    with pytest.raises(download.DownloadError, match="num_chanels"):
        download.expected_shapes(item)


def test_a_renamed_copy_of_a_config_loads_by_path_but_not_for_the_downloader(tmp_path):
    from sampling.model_configs import CONFIG_DIR, ModelConfigError, load_model_config

    copy = tmp_path / "my_adm256_finetuned.yaml"
    copy.write_text((CONFIG_DIR / "256x256_diffusion_uncond.yaml").read_text())
    assert load_model_config(copy)["name"] == "256x256_diffusion_uncond"  # --model path.yaml, as before
    with pytest.raises(ModelConfigError, match="differs from the file name"):
        load_model_config(copy, required=("name", "kind", "flags", "url", "file"))
