"""Download the official ADM checkpoints, the evaluator's reference batches and the Inception and DINOv2 weights.

Resumable (``FILE.part``, HTTP Range), verified by loading before the rename into place, recorded by size and sha256
in ./downloads/manifest.json, never replacing a present file without ``--force``: docs/sampling.md#downloads.
"""

import argparse
import datetime
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from adm_common.files import atomic_write_text, file_sha256
from adm_common.npz import NpzImages, crc_failure
from adm_common.yaml_files import read_yaml

from .model_configs import CONFIG_ROOT, REQUIRED_KEYS, ModelConfigError, check_entry, load_model_config

DEFAULT_MANIFEST = Path("downloads") / "manifest.json"
CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A problem the user has to act on; the message says what to do."""


class VerifyError(DownloadError):
    """A file is not what it should be (truncated, corrupt, or built for other flags)."""


@dataclass
class Item:
    group: str  # "models", "refs", "inception" or "dinov2"
    name: str
    kind: str  # diffusion | upsampler | classifier | reference | samples | inception | dinov2
    url: str
    file: str
    flags: Dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The manifest key: the same file has the same size and hash wherever it lies."""
        return f"{self.group}/{self.file}"


# --------------------------------------------------------------------------------------- configs


def load_model_items(configs_dir: Path = CONFIG_ROOT) -> Dict[str, Item]:
    """Every configs/models/*.yaml, by name."""
    model_dir = Path(configs_dir) / "models"
    paths = sorted(model_dir.glob("*.yaml"))
    if not paths:
        raise DownloadError(f"no model configs (*.yaml) in {model_dir}")
    items = {}
    for path in paths:
        cfg = load_model_config(path, required=REQUIRED_KEYS + ("url", "file"))  # ModelConfigError if unusable
        items[cfg["name"]] = Item("models", cfg["name"], cfg["kind"], cfg["url"], cfg["file"], cfg["flags"])
    return items


def load_ref_items(configs_dir: Path = CONFIG_ROOT) -> Dict[str, Item]:
    cfg = read_yaml(path := Path(configs_dir) / "refs.yaml", "config", DownloadError)
    if not isinstance(cfg.get("refs"), dict):
        raise DownloadError(f"{path}: expected a top-level 'refs' mapping")
    items = {}
    for name, entry in cfg["refs"].items():
        check_entry(entry, f"{path}: refs.{name}", error=DownloadError)
        items[name] = Item("refs", name, entry.get("kind", "reference"), entry["url"], entry["file"])
    return items


def load_inception_item(configs_dir: Path = CONFIG_ROOT) -> Item:
    entry = read_yaml(path := Path(configs_dir) / "refs.yaml", "config", DownloadError).get("inception")
    check_entry(entry, f"{path}: inception", error=DownloadError)
    return Item("inception", "inception", "inception", entry["url"], entry["file"])


def load_dinov2_item(configs_dir=None) -> Item:
    """Meta's DINOv2 ViT-L/14 checkpoint (FD_DINOv2): the file and URL of evaluations.dinov2's WeightsFile."""
    from evaluations.dinov2 import WEIGHTS

    return Item("dinov2", "dinov2", "dinov2", WEIGHTS.url, WEIGHTS.filename)


def select(available: Dict[str, Item], names: List[str], group: str) -> List[Item]:
    if not names:
        raise DownloadError(f"name the {group} to download (or 'all'): {', '.join(available)}")
    if names == ["all"]:
        return list(available.values())
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DownloadError(f"unknown {group}: {', '.join(unknown)}; available: {', '.join(available)}, all")
    return [available[n] for n in dict.fromkeys(names)]


# -------------------------------------------------------------------------------------- manifest


class Manifest:
    """``{key: {url, size, sha256, recorded, verified}}`` in a JSON file, saved atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries: Dict[str, Dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise DownloadError(f"manifest {self.path} is unreadable ({e}); fix or remove it") from e
            if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
                raise DownloadError(f"manifest {self.path} does not have the expected layout; fix or remove it")
            self.entries = data.get("files", {})

    def get(self, key: str) -> Optional[Dict]:
        return self.entries.get(key)

    def record(self, key: str, entry: Dict) -> None:
        self.entries[key] = entry
        atomic_write_text(self.path, json.dumps({"files": self.entries}, indent=1, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------- fetching


def _content_range(header: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total size) of a Content-Range header such as 'bytes 100-199/1000' or 'bytes */1000'."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) is not None else None), (int(m.group(2)) if m.group(2) != "*" else None)


def fetch(url: str, part: Path, *, expected_size: Optional[int] = None, retries: int = 3,
          backoff: float = 2.0, timeout: float = 60.0, progress: bool = True, log=print) -> None:
    """Download ``url`` into ``part``, continuing what ``part`` already holds (HTTP Range), until it holds the whole
    file; DownloadError after ``retries`` failed attempts (the partial file is kept, so the next run resumes)."""
    from tqdm import tqdm

    part = Path(part)
    part.parent.mkdir(parents=True, exist_ok=True)
    last_error = None
    for attempt in range(retries + 1):
        if attempt:
            delay = min(backoff * 2 ** (attempt - 1), 30.0)
            log(f"  retrying in {delay:.0f}s (attempt {attempt + 1}/{retries + 1}): {last_error}")
            time.sleep(delay)
        have = part.stat().st_size if part.exists() else 0
        if expected_size is not None and have == expected_size:
            return  # a previous run got every byte (the manifest says how many there are)
        if expected_size is not None and have > expected_size:
            part.unlink()
            have = 0
        request = urllib.request.Request(url, headers={"User-Agent": "pag-adm-download/1"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                if _content_range(e.headers.get("Content-Range"))[1] == have:
                    return  # the partial file was already complete
                log(f"  {part.name}: partial file ({have} bytes) does not fit the server's file; starting over")
                part.unlink()
                last_error = "HTTP 416"
                continue
            if e.code in (401, 403, 404, 410):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (check the URL in the config)") from e
            last_error = f"HTTP {e.code} {e.reason}"
            continue
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            last_error = getattr(e, "reason", e)
            continue
        with response:
            start, total = _content_range(response.headers.get("Content-Range"))
            if have and response.status == 206:
                if start != have:
                    log(f"  {part.name}: server resumed at byte {start}, not {have}; starting over")
                    part.unlink()
                    last_error = "misplaced range"
                    continue
                mode = "ab"
            else:
                if have:
                    log(f"  {part.name}: server does not support resuming; starting over")
                have, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            total = expected_size if total is None else total
            try:
                with tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                          desc=part.name.removesuffix(".part"), disable=None if progress else True) as bar, \
                        open(part, mode) as f:
                    for block in iter(lambda: response.read(CHUNK_BYTES), b""):
                        f.write(block)
                        bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:  # reset, timeout
                last_error = e
                continue
        got = part.stat().st_size
        if total is not None and got != total:  # a short read: the next attempt resumes
            last_error = f"connection closed after {got} of {total} bytes"
            continue
        return
    got = part.stat().st_size if part.exists() else 0
    hint = (f"{part} keeps the {got} bytes received: run the same command again to resume" if got else
            "check the network connection (or the URL in the config) and run the command again")
    raise DownloadError(f"could not download {url} after {retries + 1} attempts ({last_error}); {hint}")


# ---------------------------------------------------------------------------------- verification


def expected_shapes(item: Item) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the model that ``item``'s flags build (on the meta device: no memory)."""
    import torch
    from guided_diffusion.script_util import create_model_from_flags

    try:
        with torch.device("meta"):
            model = create_model_from_flags(item.kind, item.flags)[0]
    except ValueError as e:
        raise DownloadError(f"{item.name}: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_npz(path: Path) -> str:
    """An evaluator batch: every zip member passes its CRC check (the evaluator reads only what it needs,
    unchecked), images in ``arr_0`` and ``mu``/``sigma`` pairs if present as the evaluator reads them."""
    try:
        bad = crc_failure(path)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise VerifyError(f"{path} is not a readable npz (zip) archive (truncated or corrupt download?): {e}") from e
    if bad is not None:
        raise VerifyError(f"{path}: member {bad} fails its CRC check; corrupt download?")
    try:
        images = NpzImages(path)
    except ValueError as e:
        raise VerifyError(f"no arr_0 the evaluator can read as uint8 N x H x W x 3 images: {e}") from None
    from evaluations.reference import read_npz_statistics

    try:
        stats = read_npz_statistics(path, dims=None, both=False) or {}  # the evaluator's check, any feature size
    except ValueError as e:
        raise VerifyError(str(e)) from None
    shape = "x".join(map(str, images.shape))
    return ", ".join([f"arr_0 {images.dtype} {shape}"] + [f"{m}/{s} d={len(stats[m])}" for m, s in
                                                          (("mu", "sigma"), ("mu_s", "sigma_s")) if m in stats])


ShapesFn = Callable[[Item], Optional[Dict[str, Tuple[int, ...]]]]


def verify_file(item: Item, path: Path, shapes_fn: ShapesFn = expected_shapes) -> str:
    """Load ``path`` as what ``item`` says it is (a checkpoint, the Inception or DINOv2 weights, with the fork's
    checkpoint reader); return a one-line summary or raise VerifyError."""
    if item.group == "refs":
        return verify_npz(path)
    if item.group not in ("models", "inception", "dinov2"):
        raise DownloadError(f"{path}: cannot verify a file of group {item.group!r}; known: models, refs, inception, "
                            f"dinov2")
    from guided_diffusion.checkpoint import CheckpointError, UnreadableCheckpoint, mismatch_report, read_state_dict

    try:
        state = read_state_dict(path)
    except UnreadableCheckpoint as e:
        raise VerifyError(f"not a loadable PyTorch checkpoint: {e}") from None
    except CheckpointError as e:
        raise VerifyError(str(e)) from None
    if not state:
        raise VerifyError(f"{path} loads, but is an empty state dict")
    if item.group == "inception":
        fc = state.get("fc.weight")
        if fc is None or tuple(fc.shape) != (1008, 2048):
            raise VerifyError(f"{path} loads but is not torch-fidelity's Inception weights "
                              f"(fc.weight should be 1008 x 2048, got {None if fc is None else list(fc.shape)})")
        return f"{len(state)} tensors, fc 1008x2048"
    if item.group == "dinov2":
        from evaluations.dinov2 import MODEL_NAME, build_model, load_dinov2_weights

        try:
            load_dinov2_weights(build_model(), state)
        except (RuntimeError, ValueError) as e:
            raise VerifyError(f"{path} loads but not into {MODEL_NAME}: {e}") from None
        return f"{len(state)} tensors, loads into {MODEL_NAME}"
    expected = shapes_fn(item)
    report = expected is not None and mismatch_report(expected, {k: v.shape for k, v in state.items()},
                                                      f"checkpoint {item.name} ({path})")
    if report:
        raise VerifyError(report)
    n = sum(int(v.numel()) for v in state.values())
    return f"{len(state)} tensors, {n:,} values" + (", names and shapes match the flags" if expected else "")


# ---------------------------------------------------------------------------------------- driver


def _force_hint(item: Item) -> str:
    names = "" if item.group == item.name else f" {item.name}"  # inception, dinov2: one file each
    return f"python scripts/download.py {item.group}{names} --force"


def _check_record(item: Item, path: Path, record: Dict) -> None:
    size = path.stat().st_size
    if size != record.get("size"):
        problem = f" has {size} bytes but the manifest recorded {record.get('size')} when it was downloaded: the " \
                  "file is truncated"
    elif (digest := file_sha256(path)) != record.get("sha256"):
        problem = f": sha256 {digest} differs from the manifest's {record.get('sha256')}: the file is corrupt"
    else:
        return
    raise DownloadError(f"{path}{problem} or was replaced. Re-download it with `{_force_hint(item)}`")


def _entry(item: Item, path: Path, summary: str) -> Dict:
    return {"url": item.url, "size": path.stat().st_size, "sha256": file_sha256(path),
            "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "verified": summary}


def ensure(item: Item, dest: Path, manifest: Manifest, *, force: bool = False, verify: bool = True,
           shapes_fn: ShapesFn = expected_shapes, retries: int = 3, backoff: float = 2.0,
           progress: bool = True, log=print) -> str:
    """Make ``dest/item.file`` present, complete and verified. Returns 'present' or 'downloaded'."""
    dest = Path(dest)
    target = dest / item.file
    part = dest / (item.file + ".part")
    record = manifest.get(item.key)
    unverified = "not verified (--no-verify)"

    if target.exists() and not force:
        if target.is_dir():
            raise DownloadError(f"{target} is a directory; move it away")
        if record:
            _check_record(item, target, record)
            log(f"{item.name}: {target} present, size and sha256 match the manifest")
            return "present"
        # Present but never recorded (copied in by hand, or an older manifest): check by loading.
        try:
            summary = verify_file(item, target, shapes_fn) if verify else unverified
        except VerifyError as e:
            raise VerifyError(f"{item.name}: the existing {target} fails verification: {e}\n"
                              f"  Re-download it with `{_force_hint(item)}`") from e
        manifest.record(item.key, _entry(item, target, summary))
        log(f"{item.name}: {target} present and verified ({summary}); recorded in {manifest.path}")
        return "present"

    if force and part.exists():
        part.unlink()  # --force: start from scratch
    dest.mkdir(parents=True, exist_ok=True)
    if not os.access(dest, os.W_OK):
        raise DownloadError(f"cannot write to {dest}; choose another --dest")
    resumed = part.exists() and part.stat().st_size > 0
    log(f"{item.name}: {'resuming' if resumed else 'downloading'} {item.url} -> {target}")
    fetch(item.url, part, expected_size=None if force or not record else record.get("size"),
          retries=retries, backoff=backoff, progress=progress, log=log)
    try:
        summary = verify_file(item, part, shapes_fn) if verify else unverified
    except VerifyError as e:
        bad = part.with_name(item.file + ".bad")
        os.replace(part, bad)
        raise VerifyError(f"{item.name}: the downloaded file fails verification: {e}\n"
                          f"  It was moved to {bad}; run the command again to download it afresh.") from e
    entry = _entry(item, part, summary)
    if record and not force and (entry["size"], entry["sha256"]) != (record.get("size"), record.get("sha256")):
        raise DownloadError(
            f"{item.name}: the new download (size {entry['size']}, sha256 {entry['sha256']}) differs from the "
            f"manifest's record (size {record.get('size')}, sha256 {record.get('sha256')}); it was left at {part}. "
            f"If the upstream file really changed, accept it with `{_force_hint(item)}`")
    os.replace(part, target)
    manifest.record(item.key, entry)
    log(f"{item.name}: done ({entry['size']:,} bytes, sha256 {entry['sha256'][:16]}..., {summary})")
    return "downloaded"


def default_dest(group: str) -> Path:
    if group in ("inception", "dinov2"):
        from evaluations.features import WEIGHTS

        return Path(WEIGHTS.default_path()).parent  # torch hub's checkpoints, where the evaluator looks for both
    return Path("downloads") / group


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dest", type=Path, help="target directory (default: ./downloads/models, "
                        "./downloads/refs, or torch hub's checkpoints directory for inception and dinov2)")
    common.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                        help="size/sha256 record (default: %(default)s)")
    common.add_argument("--configs", type=Path, default=CONFIG_ROOT,
                        help="configs directory with models/*.yaml and refs.yaml (default: the repository's)")
    common.add_argument("--force", action="store_true",
                        help="download again even if present, replacing the file and its manifest record")
    common.add_argument("--no-verify", action="store_true", help="skip loading the file to check it")
    common.add_argument("--retries", type=int, default=3, help="attempts after the first (default: %(default)s)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    parser = argparse.ArgumentParser(prog="scripts/download.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="group", required=True)
    p = sub.add_parser("models", parents=[common], help="official ADM checkpoints (configs/models)")
    p.add_argument("names", nargs="*", metavar="NAME", help="checkpoint names, or 'all'")
    p = sub.add_parser("refs", parents=[common], help="evaluator reference batches (configs/refs.yaml)")
    p.add_argument("names", nargs="*", metavar="NAME", help="batch names, or 'all'")
    sub.add_parser("inception", parents=[common], help="torch-fidelity's Inception weights")
    sub.add_parser("dinov2", parents=[common], help="Meta's DINOv2 ViT-L/14 weights (for fd_dinov2)")
    sub.add_parser("list", parents=[common], help="list what can be downloaded")
    return parser


def main(argv=None, shapes_fn: ShapesFn = expected_shapes) -> int:
    args = build_parser().parse_args(argv)
    if args.retries < 0:
        print("error: --retries must be >= 0", file=sys.stderr)
        return 2
    try:
        loaders = {"models": load_model_items, "refs": load_ref_items}
        single = {"inception": load_inception_item, "dinov2": load_dinov2_item}
        if args.group == "list":
            for item in [i for load in loaders.values() for i in load(args.configs).values()] + \
                    [load(args.configs) for load in single.values()]:
                print(f"{item.group:9s} {item.name:36s} {item.kind:10s} {item.url}")
            return 0
        items = select(loaders[args.group](args.configs), args.names, args.group) if args.group in loaders else \
            [single[args.group](args.configs)]
        manifest = Manifest(args.manifest)
    except (DownloadError, ModelConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dest = args.dest if args.dest is not None else default_dest(args.group)
    failures = []
    for item in items:
        try:
            ensure(item, dest, manifest, force=args.force, verify=not args.no_verify, shapes_fn=shapes_fn,
                   retries=args.retries, progress=not args.quiet)
        except DownloadError as e:
            failures.append(item.name)
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"\ninterrupted: run the same command again to resume {item.name}", file=sys.stderr)
            return 130
    if failures:
        print(f"{len(failures)} of {len(items)} failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
