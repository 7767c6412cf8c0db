"""PyTorch evaluator compatible with OpenAI's ADM (guided-diffusion) evaluator.

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--json PATH] [--batch-size 64] [--device cuda]

prints the five lines of the upstream evaluator (``Inception Score: ``, ``FID: ``, ``sFID: ``, ``Precision: ``,
``Recall: ``); progress and notes go to stderr. From Python: ``evaluate(ref_path, sample_path, ...) -> dict``.

Protocol (as upstream): features of ``arr_0`` of both files from the 2015 TF Inception (torch-fidelity's
``inception-v3-compat``); FID on pool_3 and sFID on the 2023 spatial features, each using the npz's stored
``mu``/``sigma`` (``mu_s``/``sigma_s``) when present; Inception Score of the samples in splits of 5000;
precision/recall (k = 3) between all reference images and all samples on pool_3, with upstream's float16 distance
blocks (``--pr-precision float32`` for float32 throughout).

``--metrics`` selects among ``fid,sfid,is,pr,fd_dinov2`` (default ``fid,sfid,is,pr``: the five lines above).
``fd_dinov2`` adds EDM2's FD_DINOv2 (``evaluations/dinov2.py``) and a line ``FD_DINOv2: `` after them.

Run under ``mpiexec -n N`` (or with torch.distributed initialised), every process extracts a contiguous slice of
each file and rank 0 computes and prints the metrics.
"""

import argparse
import json
import os
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_common.files import atomic_write_text  # noqa: E402
from adm_common.launch import local_rank_from_env  # noqa: E402
from adm_common.npz import NpzImages  # noqa: E402
from evaluations.features import (  # noqa: E402
    RANDOM_WEIGHTS_MARK,
    InceptionFeatures,
    MissingInceptionWeights,
    load_extractor,
)
from evaluations.metrics import PR_PRECISIONS, frechet_distance, inception_score, precision_recall  # noqa: E402
from evaluations.reference import (  # noqa: E402
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
    "fd_dinov2": "FD_DINOv2",
}
# --metrics names -> result keys. The first four need Inception; fd_dinov2 needs DINOv2.
METRIC_RESULT_KEYS = {"is": ("inception_score",), "fid": ("fid",), "sfid": ("sfid",), "pr": ("precision", "recall"),
                      "fd_dinov2": ("fd_dinov2",)}
METRICS = ("fid", "sfid", "is", "pr", "fd_dinov2")
DEFAULT_METRICS = ("fid", "sfid", "is", "pr")
INCEPTION_METRICS = ("fid", "sfid", "is", "pr")
RESULT_FORMAT = "pag_adm.evaluation/1"
# Fewer images than this in either batch are refused (unless min_samples / --min-samples is lowered): FID, sFID and
# FD_DINOv2 estimate a covariance, IS and precision/recall a distribution, and with a handful of images the number
# is estimation error (published numbers use 50,000 samples). Random-weight networks (tests, dry runs) are exempt:
# their numbers are marked meaningless anyway.
MIN_SAMPLES = 100
DEMO_EXTRACTOR = "demo.features:DemoFeatures"  # imported only when --feature-net is given
_DEFAULT = object()


def parse_metrics(metrics=None):
    """``metrics`` (None, a comma-separated string or a list of names among ``METRICS``) -> a tuple in
    ``METRICS`` order; None -> ``DEFAULT_METRICS``."""
    if metrics is None:
        return DEFAULT_METRICS
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}: choose among {','.join(METRICS)}")
    if not names:
        raise ValueError(f"no metric selected: choose among {','.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)


def _describe(path, images, feats, stats_source, dinov2=None):
    out = {
        "path": os.path.abspath(path),
        "bytes": os.path.getsize(path),
        "num_images": images.num_images,
        "image_shape": list(images.shape[1:]),
        "sha256": (feats or {}).get("sha256") or (dinov2 or {}).get("sha256"),
        "statistics_from": stats_source,
        "features_from_cache": bool((feats or {}).get("from_cache")),
    }
    if dinov2 is not None:
        out["dinov2_statistics_from_cache"] = bool(dinov2.get("from_cache"))
    return out


def evaluate(ref_path, sample_path, *, batch_size=64, device=None, inception_weights=None,
             allow_random_weights=False, cache_dir=_DEFAULT, cache_samples=False, extractor=None,
             split_size=5000, k=3, progress=True, json_path=None, dist=None, feature_net=None,
             feature_extractor=DEMO_EXTRACTOR, metrics=None, pr_precision="float16", dinov2_weights=None,
             dinov2_extractor=None, min_samples=MIN_SAMPLES):
    """Evaluate ``sample_path`` against ``ref_path`` (both npz image batches). Returns the result dict (the
    ``--json`` content): ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` and provenance. Under
    several processes, only rank 0 gets it (others None).

    :param cache_dir: features/statistics cache; default ``~/.cache/pag_adm/eval``; None disables it. The
        reference batch is always cached there, the samples only with ``cache_samples``.
    :param extractor: an ``InceptionFeatures`` to reuse (then ``device``/``inception_weights`` are ignored).
    :param feature_net: a custom feature network's checkpoint to use instead of Inception, loaded by
        ``feature_extractor`` (``"module:Class"``; default: the CPU demo's, ``demo/features.py``, whose numbers
        are marked ``DEMO-FEATURES``).
    :param json_path: also write the result there, atomically (temp file, then rename).
    :param metrics: names among ``fid, sfid, is, pr, fd_dinov2`` (list or comma-separated string); default
        ``fid, sfid, is, pr``. The result holds only the requested metrics (``is``: ``inception_score``, ``pr``:
        ``precision`` and ``recall``); Inception runs only for the first four.
    :param pr_precision: ``"float16"`` (default: upstream's float16 distance blocks with per-block float32
        fallback) or ``"float32"`` (float32 throughout); see ``evaluations.metrics.precision_recall``. Recorded
        in the result as ``pr_precision``.
    :param dinov2_weights: the DINOv2 ViT-L/14 checkpoint for ``fd_dinov2`` (default: torch hub's cache, see
        ``evaluations/dinov2.py``); ``allow_random_weights`` applies to it too.
    :param dinov2_extractor: a ``DINOv2Features`` to reuse (then ``dinov2_weights`` is ignored).
    :param min_samples: batches with fewer images are refused (``MIN_SAMPLES``, 100; 0 scores any size), unless
        the networks have random weights. A reference and samples of other image sizes are scored with a warning
        (the result's ``input_warnings``).
    """
    metrics = parse_metrics(metrics)
    if pr_precision not in PR_PRECISIONS:
        raise ValueError(f"pr_precision must be one of {', '.join(PR_PRECISIONS)}, got {pr_precision!r}")
    use_inception = any(m in INCEPTION_METRICS for m in metrics)
    use_dinov2 = "fd_dinov2" in metrics
    if cache_dir is _DEFAULT:
        cache_dir = default_cache_dir()
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # Validate both inputs before any expensive work.
    ref_images = NpzImages(ref_path)
    sample_images = NpzImages(sample_path)
    if use_inception:
        read_npz_statistics(ref_path)
        read_npz_statistics(sample_path)
    for images in (ref_images, sample_images):
        if "pr" in metrics and images.num_images <= k:
            raise ValueError(f"{images.path}: precision/recall with k = {k} need more than {k} images, "
                             f"got {images.num_images}")
        if use_dinov2 and images.num_images < 2:
            raise ValueError(f"{images.path}: FD_DINOv2 needs at least 2 images, got {images.num_images}")
    input_warnings = []
    if tuple(ref_images.shape[1:3]) != tuple(sample_images.shape[1:3]):
        input_warnings.append(
            f"the reference images are {ref_images.shape[1]}x{ref_images.shape[2]}, the samples "
            f"{sample_images.shape[1]}x{sample_images.shape[2]}: both are resized for the network, but scores across "
            "resolutions are not the published protocol (use a reference batch of the samples' resolution)")
    for text in input_warnings:
        warnings.warn(text, UserWarning, stacklevel=2)

    dist = dist or detect_distributed()
    if device is None and dist.world_size > 1 and torch.cuda.is_available():
        local = local_rank_from_env()  # one GPU per process on a node: the launcher's local rank, as the sampler's
        device = f"cuda:{(dist.rank if local is None else local) % torch.cuda.device_count()}"
    if not use_inception:
        extractor = None
    elif extractor is None and feature_net is not None:
        extractor = load_extractor(feature_extractor, feature_net, device=device)
    elif extractor is None:
        extractor = InceptionFeatures(weights_path=inception_weights, allow_random_weights=allow_random_weights,
                                      device=device)
    if not use_dinov2:
        dinov2_extractor = None
    elif dinov2_extractor is None:
        from evaluations.dinov2 import DINOv2Features

        dinov2_extractor = DINOv2Features(weights_path=dinov2_weights, allow_random_weights=allow_random_weights,
                                          device=device)
    if min_samples and not all(getattr(ex, "random_weights", False)
                               for ex in (extractor, dinov2_extractor) if ex is not None):
        for images in (ref_images, sample_images):
            if images.num_images < min_samples:
                raise ValueError(
                    f"{images.path} holds {images.num_images} images, fewer than the minimum of {min_samples}: with so "
                    "few the scores are estimation error (published numbers use 50,000 samples); evaluate more, or "
                    f"pass --min-samples {images.num_images} (min_samples={images.num_images}) to score them anyway")
    started = time.time()
    ref = sample = ref_dino = sample_dino = None
    if extractor is not None:
        ref = batch_features(ref_path, extractor, batch_size, cache_dir, progress, dist, desc="reference")
        sample = batch_features(sample_path, extractor, batch_size, cache_dir if cache_samples else None, progress,
                                dist, desc="samples")
    if dinov2_extractor is not None:
        from evaluations.dinov2 import dinov2_statistics

        ref_dino = dinov2_statistics(ref_path, dinov2_extractor, batch_size, cache_dir, progress, dist,
                                     desc="reference")
        sample_dino = dinov2_statistics(sample_path, dinov2_extractor, batch_size,
                                        cache_dir if cache_samples else None, progress, dist, desc="samples")
    if dist.rank != 0:
        return None

    result, marks, settings = {}, {}, {}
    ref_source = sample_source = None
    inception_mark = extractor.marker if extractor is not None else None
    if "fid" in metrics or "sfid" in metrics:
        ref_stats, ref_source = image_batch_statistics(ref_path, ref)
        sample_stats, sample_source = image_batch_statistics(sample_path, sample)
    if "is" in metrics:
        result["inception_score"] = inception_score(sample["logits"], split_size=split_size)
    if "fid" in metrics:
        result["fid"] = frechet_distance(sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"],
                                         ref_stats["sigma"])
    if "sfid" in metrics:
        result["sfid"] = frechet_distance(sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"],
                                          ref_stats["sigma_s"])
    if "pr" in metrics:
        blocks = []
        result["precision"], result["recall"] = precision_recall(ref["pool"], sample["pool"], k=k,
                                                                 device=extractor.device, pr_precision=pr_precision,
                                                                 block_log=blocks)
        settings["pr_blocks"] = {p: sum(b[3] == p for b in blocks) for p in PR_PRECISIONS}
    for key in result:
        marks[key] = inception_mark
    if dinov2_extractor is not None:
        result["fd_dinov2"] = frechet_distance(sample_dino["mu"], sample_dino["sigma"], ref_dino["mu"],
                                               ref_dino["sigma"])
        marks["fd_dinov2"] = dinov2_extractor.marker
    random_nets = [name for name, ex in (("Inception", extractor), ("DINOv2", dinov2_extractor))
                   if ex is not None and ex.random_weights]
    if "pr" in metrics:
        result["pr_precision"] = pr_precision
    result.update({
        "format": RESULT_FORMAT,
        "metrics": list(metrics),
        "random_weights": bool(random_nets),
        # The row's mark (tables): the Inception extractor's, else RANDOM-WEIGHTS when DINOv2's weights are.
        "marker": inception_mark or (RANDOM_WEIGHTS_MARK if random_nets else None),
        "marks": marks,  # per metric: the mark printed beside it
        "ref": _describe(ref_path, ref_images, ref, ref_source, ref_dino),
        "sample": _describe(sample_path, sample_images, sample, sample_source, sample_dino),
        "extractor": extractor.id if extractor is not None else None,
        "inception_weights": extractor.weights_path if extractor is not None else None,
        "settings": dict({"batch_size": batch_size, "split_size": split_size, "k": k,
                          "device": str((extractor if extractor is not None else dinov2_extractor).device),
                          "processes": dist.world_size}, **settings),
        "versions": _versions(use_dinov2),
        "seconds": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if dinov2_extractor is not None:
        result["dinov2"] = {"extractor": dinov2_extractor.id, "model": dinov2_extractor.model_name,
                            "weights": dinov2_extractor.weights_path,
                            "random_weights": dinov2_extractor.random_weights, "marker": dinov2_extractor.marker}
    if input_warnings:
        result["input_warnings"] = input_warnings
    if random_nets:
        result["warning"] = (f"{RANDOM_WEIGHTS_MARK}: computed with a randomly initialised "
                             f"{' and '.join(random_nets)} network; the numbers marked so mean nothing and must not "
                             "be compared with anything")
    if json_path:
        write_json(json_path, result)
    return result


def _versions(dinov2=False):
    import numpy
    import scipy
    import torch
    import torch_fidelity

    out = {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__, "numpy": numpy.__version__,
           "scipy": scipy.__version__}
    if dinov2:
        import timm

        out["timm"] = timm.__version__
    return out


def write_json(path, result):
    """Atomic: a temp file in the same directory, renamed over ``path``."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")


def result_marker(result):
    """The mark of a result dict (RANDOM-WEIGHTS, DEMO-FEATURES or None), also for results written before
    results carried a ``marker``."""
    return result.get("marker") or (RANDOM_WEIGHTS_MARK if result.get("random_weights") else None)


def format_lines(result):
    """The upstream evaluator's five lines (those of the metrics the result holds), then ``FD_DINOv2: `` when it
    holds that; with random weights (or the demo's feature network) a line carries its network's mark
    (RANDOM-WEIGHTS, DEMO-FEATURES)."""
    marks = result.get("marks")
    lines = []
    for key in METRIC_KEYS + ("fd_dinov2",):
        if key not in result:
            continue
        marker = marks.get(key) if isinstance(marks, dict) else result_marker(result)
        lines.append(f"{METRIC_LABELS[key]}: {float(result[key])!r}" + (f"  [{marker}]" if marker else ""))
    return lines


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
                   help="use a custom feature network instead of Inception (default loader: the CPU demo's, "
                        "numbers marked DEMO-FEATURES)")
    p.add_argument("--feature-extractor", metavar="MODULE:CLASS", default=DEMO_EXTRACTOR,
                   help="the class that loads --feature-net (default: %(default)s)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, among {','.join(METRICS)} (default: %(default)s)")
    p.add_argument("--pr-precision", choices=PR_PRECISIONS, default="float16",
                   help="precision/recall distances: float16 blocks with float32 fallback as OpenAI's evaluator "
                        "(default), or float32 throughout")
    p.add_argument("--min-samples", type=int, default=MIN_SAMPLES, metavar="N",
                   help="refuse batches of fewer images (default: %(default)s; 0: score any size; random-weight "
                        "networks are exempt)")
    p.add_argument("--dinov2-weights", metavar="PATH",
                   help="DINOv2 ViT-L/14 checkpoint dinov2_vitl14_pretrain.pth for fd_dinov2 (default: torch hub "
                        "cache; make download-dinov2)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    dist = detect_distributed()
    try:
        result = evaluate(
            args.ref_batch, args.sample_batch, batch_size=args.batch_size, device=args.device,
            inception_weights=args.inception_weights, allow_random_weights=args.allow_random_weights,
            cache_dir=None if args.no_cache else args.cache_dir, cache_samples=args.cache_samples,
            progress=not args.no_progress, json_path=args.json, feature_net=args.feature_net,
            feature_extractor=args.feature_extractor, metrics=args.metrics, pr_precision=args.pr_precision,
            dinov2_weights=args.dinov2_weights, min_samples=args.min_samples, dist=dist,
        )
    except (MissingInceptionWeights, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.close()  # a process group made for this evaluation ends with it
    if result is None:  # not rank 0
        return 0
    if result["random_weights"]:
        print(f"WARNING: {result['warning']}")
    for line in format_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
