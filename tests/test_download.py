"""sampling/downloads.py (scripts/download.py) against a local HTTP server (no network): resume, skip, manifest,
verification."""

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from http_fixture import FileServer
from sampling import downloads as download

SHAPES = {"a.weight": (64, 32), "a.bias": (64,), "b.weight": (8, 64, 3, 3)}


def checkpoint_bytes(shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({k: torch.randn(*s, generator=g) for k, s in shapes.items()}, buf)
    return buf.getvalue()


def npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def images(n=4, size=8, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3)).astype(dtype)


def fixed_shapes(item):
    return SHAPES


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def model_item(server, data, name="tiny", path="/ckpt/tiny.pt"):
    server.files[path] = data
    return download.Item("models", name, "diffusion", server.url(path), "tiny.pt", {})


def ref_item(server, data, path="/refs/ref.npz"):
    server.files[path] = data
    return download.Item("refs", "ref", "reference", server.url(path), "ref.npz")


def run(item, tmp_path, **kw):
    manifest = download.Manifest(tmp_path / "manifest.json")
    kw.setdefault("shapes_fn", fixed_shapes)
    kw.setdefault("backoff", 0.0)
    status = download.ensure(item, tmp_path / "dest", manifest, progress=False, log=lambda *a: None, **kw)
    return status, manifest


# ------------------------------------------------------------------------------- download and skip


def test_fresh_download_is_verified_and_recorded(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    status, manifest = run(item, tmp_path)
    target = tmp_path / "dest" / "tiny.pt"
    assert status == "downloaded"
    assert target.read_bytes() == data
    assert not (tmp_path / "dest" / "tiny.pt.part").exists()
    rec = json.loads((tmp_path / "manifest.json").read_text())["files"]["models/tiny.pt"]
    assert rec["size"] == len(data)
    assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["url"] == item.url
    assert "match" in rec["verified"]


def test_complete_file_is_skipped_without_network(server, tmp_path):
    item = model_item(server, checkpoint_bytes())
    run(item, tmp_path)
    n = len(server.requests)
    status, _ = run(item, tmp_path)
    assert status == "present"
    assert len(server.requests) == n


def test_resume_from_partial_part_file(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "tiny.pt.part").write_bytes(data[:1000])
    status, _ = run(item, tmp_path)
    assert status == "downloaded"
    assert server.requests == [("/ckpt/tiny.pt", "bytes=1000-")]
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


def test_dropped_connection_is_resumed_by_retry(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    server.drop_after["/ckpt/tiny.pt"] = 5000
    status, _ = run(item, tmp_path, retries=2)
    assert status == "downloaded"
    assert [r for _, r in server.requests] == [None, "bytes=5000-"]
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


def test_dropped_connection_without_retries_keeps_part_for_next_run(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    server.drop_after["/ckpt/tiny.pt"] = 5000
    with pytest.raises(download.DownloadError, match="run the same command again to resume"):
        run(item, tmp_path, retries=0)
    part = tmp_path / "dest" / "tiny.pt.part"
    assert part.read_bytes() == data[:5000]
    assert not (tmp_path / "dest" / "tiny.pt").exists()
    run(item, tmp_path, retries=0)  # the next run resumes
    assert server.requests[-1][1] == "bytes=5000-"
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    server.ignore_range = True
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "tiny.pt.part").write_bytes(b"x" * 700)  # would corrupt an append
    run(item, tmp_path)
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


def test_part_file_already_complete(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "tiny.pt.part").write_bytes(data)
    status, _ = run(item, tmp_path)  # server answers 416 with the total size
    assert status == "downloaded"
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


def test_http_404_is_a_clear_error(server, tmp_path):
    item = download.Item("models", "gone", "diffusion", server.url("/nothing.pt"), "gone.pt", {})
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        run(item, tmp_path)


def test_file_url_mirror(tmp_path):
    src = tmp_path / "mirror" / "tiny.pt"
    src.parent.mkdir()
    data = checkpoint_bytes()
    src.write_bytes(data)
    item = download.Item("models", "tiny", "diffusion", src.as_uri(), "tiny.pt", {})
    status, _ = run(item, tmp_path)
    assert status == "downloaded"
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data


# ------------------------------------------------------------------------------------- manifest


def test_sha256_mismatch_is_detected_and_file_kept(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    run(item, tmp_path)
    target = tmp_path / "dest" / "tiny.pt"
    tampered = bytearray(data)
    tampered[-100] ^= 0xFF
    target.write_bytes(bytes(tampered))
    with pytest.raises(download.DownloadError, match=r"sha256 .* differs.*--force"):
        run(item, tmp_path)
    assert target.read_bytes() == bytes(tampered)  # never overwritten silently


def test_size_mismatch_is_detected(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    run(item, tmp_path)
    (tmp_path / "dest" / "tiny.pt").write_bytes(data[:-10])
    with pytest.raises(download.DownloadError, match=r"bytes but the manifest recorded .*models tiny --force"):
        run(item, tmp_path)


def test_force_replaces_a_bad_file(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    run(item, tmp_path)
    (tmp_path / "dest" / "tiny.pt").write_bytes(b"garbage")
    status, manifest = run(item, tmp_path, force=True)
    assert status == "downloaded"
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == data
    assert manifest.get("models/tiny.pt")["sha256"] == hashlib.sha256(data).hexdigest()


def test_redownload_differing_from_manifest_is_refused(server, tmp_path):
    item = model_item(server, checkpoint_bytes(seed=0))
    run(item, tmp_path)
    (tmp_path / "dest" / "tiny.pt").unlink()
    server.files["/ckpt/tiny.pt"] = checkpoint_bytes(seed=1)  # same size and names, other values
    with pytest.raises(download.DownloadError, match="differs from the manifest's record"):
        run(item, tmp_path)
    assert not (tmp_path / "dest" / "tiny.pt").exists()


def test_existing_unrecorded_file_is_verified_then_recorded(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "tiny.pt").write_bytes(data)
    status, manifest = run(item, tmp_path)
    assert status == "present"
    assert server.requests == []
    assert manifest.get("models/tiny.pt")["size"] == len(data)


def test_existing_unrecorded_bad_file_is_an_error_not_overwritten(server, tmp_path):
    item = model_item(server, checkpoint_bytes())
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "tiny.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(download.VerifyError, match="--force"):
        run(item, tmp_path)
    assert (tmp_path / "dest" / "tiny.pt").read_bytes() == b"not a checkpoint"


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(download.DownloadError, match="manifest .* unreadable"):
        download.Manifest(tmp_path / "manifest.json")


# ---------------------------------------------------------------------------------- verification


def test_truncated_checkpoint_fails_verification(server, tmp_path):
    data = checkpoint_bytes()
    item = model_item(server, data[: len(data) // 2])
    with pytest.raises(download.VerifyError, match="not a loadable PyTorch checkpoint"):
        run(item, tmp_path)
    assert not (tmp_path / "dest" / "tiny.pt").exists()
    assert (tmp_path / "dest" / "tiny.pt.bad").exists()
    assert download.Manifest(tmp_path / "manifest.json").get("models/tiny.pt") is None


def test_corrupt_checkpoint_fails_verification(server, tmp_path):
    item = model_item(server, np.random.default_rng(0).bytes(20000))
    with pytest.raises(download.VerifyError, match="not a loadable PyTorch checkpoint"):
        run(item, tmp_path)


def test_checkpoint_shape_mismatch_detected(server, tmp_path):
    item = model_item(server, checkpoint_bytes())
    expected = dict(SHAPES, **{"b.weight": (16, 64, 3, 3), "c.bias": (3,)})
    with pytest.raises(download.VerifyError) as err:
        run(item, tmp_path, shapes_fn=lambda it: expected)
    msg = str(err.value)
    assert "1 missing keys, e.g. c.bias" in msg
    assert "b.weight: checkpoint [8, 64, 3, 3] vs model [16, 64, 3, 3]" in msg
    assert not (tmp_path / "dest" / "tiny.pt").exists()


def test_checkpoint_that_is_not_a_state_dict(server, tmp_path):
    buf = io.BytesIO()
    torch.save([1, 2, 3], buf)
    item = model_item(server, buf.getvalue())
    with pytest.raises(download.VerifyError, match="not a state dict"):
        run(item, tmp_path)


def test_npz_reference_batch_verifies(server, tmp_path):
    d = 16
    data = npz_bytes(arr_0=images(), mu=np.zeros(d), sigma=np.eye(d), mu_s=np.ones(4), sigma_s=np.eye(4))
    status, manifest = run(ref_item(server, data), tmp_path)
    assert status == "downloaded"
    assert manifest.get("refs/ref.npz")["verified"] == "arr_0 uint8 4x8x8x3, mu/sigma d=16, mu_s/sigma_s d=4"


def test_npz_without_arr_0_fails(server, tmp_path):
    with pytest.raises(download.VerifyError, match="no arr_0.*mu, sigma"):
        run(ref_item(server, npz_bytes(mu=np.zeros(4), sigma=np.eye(4))), tmp_path)


def test_npz_with_float_images_fails(server, tmp_path):
    with pytest.raises(download.VerifyError, match="uint8 images"):
        run(ref_item(server, npz_bytes(arr_0=images(dtype=np.float32))), tmp_path)


def test_npz_with_inconsistent_statistics_fails(server, tmp_path):
    with pytest.raises(download.VerifyError, match="sigma a float"):
        run(ref_item(server, npz_bytes(arr_0=images(), mu=np.zeros(4), sigma=np.eye(5))), tmp_path)
    with pytest.raises(download.VerifyError, match="not its partner"):
        run(ref_item(server, npz_bytes(arr_0=images(), mu=np.zeros(4))), tmp_path)


def test_truncated_npz_fails(server, tmp_path):
    data = npz_bytes(arr_0=images(n=50))
    with pytest.raises(download.VerifyError, match="npz"):
        run(ref_item(server, data[: len(data) - 300]), tmp_path)


def test_npz_with_corrupt_member_fails(tmp_path):
    data = bytearray(npz_bytes(arr_0=images(n=50)))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("arr_0.npy")
    middle = info.header_offset + 30 + len(info.filename) + 2000  # inside the stored array
    data[middle] ^= 0xFF
    path = tmp_path / "x.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(download.VerifyError, match="CRC|corrupt"):
        download.verify_npz(path)


def test_inception_weights_check(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, good)
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, bad)
    item = download.Item("inception", "inception", "inception", "unused", "w.pth")
    assert "fc 1008x2048" in download.verify_file(item, good)
    with pytest.raises(download.VerifyError, match="not torch-fidelity's Inception"):
        download.verify_file(item, bad)
    with pytest.raises(download.DownloadError, match="group 'weights'; known: models, refs, inception, dinov2"):
        download.verify_file(download.Item("weights", "w", "inception", "unused", "w.pth"), good)


# ------------------------------------------------------------------------------------------- CLI


def write_configs(root, server):
    (root / "models").mkdir(parents=True)
    server.files["/m/tiny.pt"] = checkpoint_bytes()
    server.files["/r/ref.npz"] = npz_bytes(arr_0=images())
    server.files["/w/inc.pth"] = b"unused"
    (root / "models" / "tiny.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "kind": "diffusion", "url": server.url("/m/tiny.pt"), "file": "tiny.pt", "flags": {}}))
    (root / "refs.yaml").write_text(yaml.safe_dump({
        "refs": {"ref": {"file": "ref.npz", "url": server.url("/r/ref.npz")}},
        "inception": {"file": "inc.pth", "url": server.url("/w/inc.pth")}}))


def test_cli_models_refs_and_rerun(server, tmp_path, capsys):
    write_configs(tmp_path / "configs", server)
    common = ["--configs", str(tmp_path / "configs"), "--manifest", str(tmp_path / "m.json"), "--quiet"]
    assert download.main(["models", "all", "--dest", str(tmp_path / "models")] + common, shapes_fn=fixed_shapes) == 0
    assert download.main(["refs", "ref", "--dest", str(tmp_path / "refs")] + common) == 0
    assert (tmp_path / "models" / "tiny.pt").exists() and (tmp_path / "refs" / "ref.npz").exists()
    n = len(server.requests)
    assert download.main(["models", "tiny", "--dest", str(tmp_path / "models")] + common, shapes_fn=fixed_shapes) == 0
    assert len(server.requests) == n
    assert "match the manifest" in capsys.readouterr().out
    files = json.loads((tmp_path / "m.json").read_text())["files"]
    assert set(files) == {"models/tiny.pt", "refs/ref.npz"}


def test_cli_errors(server, tmp_path, capsys):
    write_configs(tmp_path / "configs", server)
    common = ["--configs", str(tmp_path / "configs"), "--manifest", str(tmp_path / "m.json"), "--quiet"]
    assert download.main(["models", "nope"] + common) == 1
    assert "unknown models: nope; available: tiny, all" in capsys.readouterr().err
    assert download.main(["models"] + common) == 1
    # The inception entry serves junk: verification fails, nothing is installed.
    assert download.main(["inception", "--dest", str(tmp_path / "hub")] + common) == 1
    assert "not a loadable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "hub" / "inc.pth").exists()


def test_repository_configs_load():
    models = download.load_model_items()
    assert len(models) == 12
    assert {"256x256_diffusion_uncond", "256x256_diffusion", "256x256_classifier"} <= set(models)
    refs = download.load_ref_items()
    assert refs["imagenet256"].file == "VIRTUAL_imagenet256_labeled.npz"
    inception = download.load_inception_item()
    assert inception.file == "weights-inception-2015-12-05-6726825d.pth"
    assert download.default_dest("inception") == Path(torch.hub.get_dir()) / "checkpoints"


def test_makefile_targets():
    text = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    for target in ("download-models:", "download-refs:", "download-inception:"):
        assert target in text
    assert "MODELS ?= 256x256_diffusion_uncond 256x256_diffusion 256x256_classifier" in text
    assert "REFS ?= imagenet256" in text
