"""PyTorch evaluator compatible with OpenAI's ADM (guided-diffusion) evaluator.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--json PATH] [--batch-size 64] [--device cuda]

prints the five lines of the upstream evaluator (``Inception Score: ``, ``FID: ``, ``sFID: ``, ``Precision: ``,
``Recall: ``); progress and notes go to stderr. From Python: ``evaluate(ref_path, sample_path, ...) -> dict``.

Protocol (as upstream): features of ``arr_0`` of both files from the 2015 TF Inception (torch-fidelity's
``inception-v3-compat``); FID on pool_3 and sFID on the 2023 spatial features, each using the npz's stored
``mu``/``sigma`` (``mu_s``/``sigma_s``) when present; Inception Score of the samples in splits of 5000;
precision/recall (k = 3) between all reference images and all samples on pool_3.

Run under ``mpiexec -n N`` (or with torch.distributed initialised), every process extracts a contiguous slice of
each file and rank 0 computes and prints the metrics.
"""

import argparse
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations.features import RANDOM_WEIGHTS_MARK, InceptionFeatures, MissingInceptionWeights  # noqa: E402
from evaluations.metrics import frechet_distance, inception_score, precision_recall  # noqa: E402
from evaluations.reference import (  # noqa: E402
    NpzImages,
    atomic_write_text,
    batch_features,
    default_cache_dir,
    detect_distributed,
    image_batch_statistics,
    read_npz_statistics,
)

METRIC_KEYS = ("inception_score", "fid", "sfid", "precision", "recall")
METRIC_LABELS = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}
RESULT_FORMAT = "pag_adm.evaluation/1"
_DEFAULT = object()


def _describe(path, images, feats, stats_source):
    return {
        "path": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "num_images": images.num_images,
        "image_shape": list(images.shape[1:]),
        "sha256": feats.get("sha256"),
        "statistics_from": stats_source,
        "features_from_cache": bool(feats.get("from_cache")),
    }


def evaluate(ref_path, sample_path, *, batch_size=64, device=None, inception_weights=None,
             allow_random_weights=False, cache_dir=_DEFAULT, cache_samples=False, extractor=None,
             split_size=5000, k=3, progress=True, json_path=None, dist=None, feature_net=None):
    """Evaluate ``sample_path`` against ``ref_path`` (both npz image batches). Returns the result dict (the
    ``--json`` content): ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` and provenance. Under
    several processes, only rank 0 gets it (others None).

    :param cache_dir: features/statistics cache; default ``~/.cache/pag_adm/eval``; None disables it. The
        reference batch is always cached there, the samples only with ``cache_samples``.
    :param extractor: an ``InceptionFeatures`` to reuse (then ``device``/``inception_weights`` are ignored).
    :param feature_net: the CPU demo's feature network checkpoint (``evaluations/demo_features.py``) to use
        instead of Inception; every number is then marked ``DEMO-FEATURES``.
    :param json_path: also write the result there, atomically (temp file, then rename).
    """
    if cache_dir is _DEFAULT:
        cache_dir = default_cache_dir()
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # Validate both inputs before any expensive work.
    ref_images = NpzImages(ref_path)
    sample_images = NpzImages(sample_path)
    read_npz_statistics(ref_path)
    read_npz_statistics(sample_path)
    for images in (ref_images, sample_images):
        if images.num_images <= k:
            raise ValueError(f"{images.path}: precision/recall with k = {k} need more than {k} images, "
                             f"got {images.num_images}")

    dist = dist or detect_distributed()
    if device is None and dist.world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{dist.rank % torch.cuda.device_count()}"  # one GPU per process on a node
    if extractor is None and feature_net is not None:
        from .demo_features import DemoFeatures

        extractor = DemoFeatures(feature_net, device=device)
    if extractor is None:
        extractor = InceptionFeatures(weights_path=inception_weights, allow_random_weights=allow_random_weights,
                                      device=device)
    started = time.time()
    ref = batch_features(ref_path, extractor, batch_size, cache_dir, progress, dist, desc="reference")
    sample = batch_features(sample_path, extractor, batch_size, cache_dir if cache_samples else None, progress,
                            dist, desc="samples")
    if dist.rank != 0:
        return None

    ref_stats, ref_source = image_batch_statistics(ref_path, ref)
    sample_stats, sample_source = image_batch_statistics(sample_path, sample)
    result = {
        "inception_score": inception_score(sample["logits"], split_size=split_size),
        "fid": frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"]),
        "sfid": frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"],
                                 ref_stats["sigma_s"]),
    }
    result["precision"], result["recall"] = precision_recall(ref["pool"], sample["pool"], k=k,
                                                             device=extractor.device)
    result.update({
        "format": RESULT_FORMAT,
        "random_weights": extractor.random_weights,
        "marker": extractor.marker,
        "ref": _describe(ref_path, ref_images, ref, ref_source),
        "sample": _describe(sample_path, sample_images, sample, sample_source),
        "extractor": extractor.id,
        "inception_weights": extractor.weights_path,
        "settings": {"batch_size": batch_size, "split_size": split_size, "k": k, "device": str(extractor.device),
                     "processes": dist.world_size},
        "versions": _versions(),
        "seconds": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if extractor.random_weights:
        result["warning"] = (f"{RANDOM_WEIGHTS_MARK}: computed with a randomly initialised Inception network; "
                             "these numbers mean nothing and must not be compared with anything")
    if json_path:
        write_json(json_path, result)
    return result


def _versions():
    import numpy
    import scipy
    import torch
    import torch_fidelity

    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__}


def write_json(path, result):
    """Atomic: a temp file in the same directory, renamed over ``path``."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")


def result_marker(result):
    """The mark of a result dict (RANDOM-WEIGHTS, DEMO-FEATURES or None), also for results written before
    results carried a ``marker``."""
    return result.get("marker") or (RANDOM_WEIGHTS_MARK if result.get("random_weights") else None)


def format_lines(result):
    """The upstream evaluator's five lines; with random weights (or the demo's feature network) each carries
    the result's mark (RANDOM-WEIGHTS, DEMO-FEATURES)."""
    marker = result_marker(result)
    mark = f"  [{marker}]" if marker else ""
    return [f"{METRIC_LABELS[key]}: {float(result[key])!r}{mark}" for key in METRIC_KEYS]


def build_parser():
    p = argparse.ArgumentParser(description="ADM-compatible evaluator: IS, FID, sFID, precision, recall.")
    p.add_argument("ref_batch", help="reference batch npz (arr_0: uint8 N x H x W x 3; optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch npz (arr_0: uint8 N x H x W x 3)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics and the inputs' details as JSON")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="without weights, use a randomly initialised network (tests, dry runs; numbers meaningless)")
    p.add_argument("--cache-dir", default=default_cache_dir(),
                   help="feature/statistics cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--cache-samples", action="store_true", help="cache the sample batch's features too")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--feature-net", metavar="PATH",
                   help="use the CPU demo's feature network instead of Inception (numbers marked DEMO-FEATURES)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = evaluate(
            args.ref_batch, args.sample_batch, batch_size=args.batch_size, device=args.device,
            inception_weights=args.inception_weights, allow_random_weights=args.allow_random_weights,
            cache_dir=None if args.no_cache else args.cache_dir, cache_samples=args.cache_samples,
            progress=not args.no_progress, json_path=args.json, feature_net=args.feature_net,
        )
    except (MissingInceptionWeights, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is None:  # not rank 0
        return 0
    if result["random_weights"]:
        print(f"WARNING: {result['warning']}")
    for line in format_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
