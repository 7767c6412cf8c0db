"""PyTorch evaluator compatible with OpenAI's ADM (guided-diffusion) evaluator (options, protocol: docs/evaluation.md).

    python evaluations/evaluator.py REF.npz SAMPLE.npz [--json PATH] [--metrics fid,sfid,is,pr,fd_dinov2]

prints upstream's five lines (then ``FD_DINOv2: `` when asked); progress goes to stderr. Under ``mpiexec -n N``,
torchrun or srun each process extracts a slice of each file; rank 0 prints the metrics.
"""

import importlib
import json
import os
import sys
import time
import warnings
from dataclasses import MISSING, dataclass, field, fields

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_common.files import atomic_write_text  # noqa: E402
from adm_common.flags import FlagParser  # noqa: E402
from adm_common.launch import local_rank_from_env, rank_from_env  # noqa: E402
from adm_common.rendezvous import DistSetupError, cuda_index  # noqa: E402
from adm_common.npz import NpzImages  # noqa: E402
from evaluations.bootstrap import (  # noqa: E402
    BOOTSTRAP_SEED, bootstrap, check_bootstrap, frechet_fn, inception_score_fn, precision_recall_fns)
from evaluations.features import (  # noqa: E402
    RANDOM_WEIGHTS_MARK, InceptionFeatures, MissingInceptionWeights, load_extractor)
from evaluations.metrics import (  # noqa: E402
    DEFAULT_METRICS, METRIC_KEYS, METRIC_TABLE, METRICS, METRICS_BY_KEY, PR_PRECISIONS, check_pr_precision,
    frechet_distance, inception_score, manifold_memberships, parse_metrics)
from evaluations.reference import (  # noqa: E402
    FeatureUse, default_cache_dir, detect_distributed, fid_statistics, image_features, read_npz_statistics)

RESULT_FORMAT = "pag_adm.evaluation/1"
# Fewer images than this in either batch are refused (unless min_samples / --min-samples is lowered): FID, sFID and
# FD_DINOv2 estimate a covariance, IS and precision/recall a distribution, and with a handful of images the number
# is estimation error (published numbers use 50,000 samples). Random-weight networks (tests, dry runs) are exempt:
# their numbers are marked meaningless anyway.
MIN_SAMPLES = 100


@dataclass(frozen=True)
class EvaluationSettings:
    """:func:`evaluate`'s keyword options (a sweep's ``evaluation:`` mapping), each the flag of the same name
    (:func:`build_parser` has their help); ``metrics``: a list or a comma-separated string; ``cache_dir=None``
    caches nothing; ``feature_net`` is loaded by ``feature_extractor`` (``"module:Class"``)."""

    metrics: tuple = None
    batch_size: int = 64
    device: str = None
    cache_dir: str = field(default_factory=default_cache_dir)
    cache_samples: bool = False
    progress: bool = True
    inception_weights: str = None
    dinov2_weights: str = None
    allow_random_weights: bool = False
    feature_net: str = None
    feature_extractor: str = "demo.features:DemoFeatures"  # imported only when --feature-net is given
    pr_precision: str = "float16"
    split_size: int = 5000
    k: int = 3
    min_samples: int = MIN_SAMPLES
    bootstrap: int = 0
    bootstrap_seed: int = BOOTSTRAP_SEED

    def __post_init__(self):
        object.__setattr__(self, "metrics", parse_metrics(self.metrics))
        check_pr_precision(self.pr_precision)
        check_bootstrap(self.bootstrap)
        if self.bootstrap and self.metrics == ("fd_dinov2",):
            raise ValueError("bootstrap intervals are computed for fid, sfid, is and pr, not for fd_dinov2 alone")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")

    def wants(self, network):
        """Whether a requested metric needs ``network`` ("inception", "dinov2")."""
        return any(m.network == network for m in METRIC_TABLE if m.option in self.metrics)


EVALUATION_OPTIONS = tuple(EvaluationSettings.__dataclass_fields__)  # evaluate()'s keyword options


def evaluate(ref_path, sample_path, *, json_path=None, dist=None, extractor=None, dinov2_extractor=None,
             **options):
    """Evaluate ``sample_path`` against ``ref_path`` (both npz image batches) with the :class:`EvaluationSettings`
    ``options``: the result dict (the ``--json`` content, also written to ``json_path``) on rank 0, None on other
    ranks. Both files are read and checked before any work, then each streamed once through every network it
    needs; ``extractor`` and ``dinov2_extractor`` are networks to reuse instead of building them."""
    s = EvaluationSettings(**options)
    batches = {"ref": _open_batch(ref_path, s), "sample": _open_batch(sample_path, s)}
    ref_hw, sample_hw = (batches[name][0].shape[1:3] for name in ("ref", "sample"))
    input_warnings = [] if ref_hw == sample_hw else [
        f"the reference images are {ref_hw[0]}x{ref_hw[1]}, the samples {sample_hw[0]}x{sample_hw[1]}: both are "
        "resized for the network, but scores across resolutions are not the published protocol (use a reference "
        "batch of the samples' resolution)"]
    for text in input_warnings:
        warnings.warn(text, UserWarning, stacklevel=2)
    dist = dist or detect_distributed()
    device, local = s.device, local_rank_from_env()
    if device is None and dist.world_size > 1 and torch.cuda.is_available():  # as the sampler: one GPU a process
        device = f"cuda:{cuda_index(dist.rank if local is None else local, wrap=True)}"
    nets = _networks(s, device, extractor, dinov2_extractor)
    _check_sizes(s, nets, [images for images, _ in batches.values()])
    started = time.time()
    feats = {}
    for name, (images, _) in batches.items():
        # The bootstrap's sFID resamples the samples' spatial features, which are otherwise reduced to statistics.
        keep_spatial = name == "sample" and bool(s.bootstrap) and "sfid" in s.metrics
        uses = [FeatureUse.inception(net, keep_spatial) if net_name == "inception" else FeatureUse(net)
                for net_name, net in nets.items()]
        out = image_features(images, uses, s.batch_size, s.cache_dir if name == "ref" or s.cache_samples else None,
                             s.progress, dist, desc="reference" if name == "ref" else "samples")
        feats[name] = out and dict(zip(nets, out))
    if dist.rank != 0:
        return None
    result, details = _scores(s, nets, batches, feats)
    result.update(_provenance(s, nets, batches, feats, details, dist, started))
    if input_warnings:
        result["input_warnings"] = input_warnings
    if json_path:
        write_result(json_path, result)
    return result


def _open_batch(path, s):
    """An npz's images (header read and checked) and its stored FID statistics (None without), each read once."""
    images = NpzImages(path)
    if "pr" in s.metrics and images.num_images <= s.k:
        raise ValueError(f"{images.path}: precision/recall with k = {s.k} need more than {s.k} images, "
                         f"got {images.num_images}")
    if "fd_dinov2" in s.metrics and images.num_images < 2:
        raise ValueError(f"{images.path}: FD_DINOv2 needs at least 2 images, got {images.num_images}")
    return images, (read_npz_statistics(path) if s.wants("inception") else None)


def _networks(s, device, extractor, dinov2_extractor):
    """``{"inception": ..., "dinov2": ...}``: the networks the metrics need, given or built from the settings."""
    nets = {}
    if s.wants("inception"):
        nets["inception"] = extractor or (
            load_extractor(s.feature_extractor, s.feature_net, device=device) if s.feature_net is not None else
            InceptionFeatures(weights_path=s.inception_weights, allow_random_weights=s.allow_random_weights,
                              device=device))
    if s.wants("dinov2"):
        from evaluations.dinov2 import DINOv2Features

        nets["dinov2"] = dinov2_extractor or DINOv2Features(
            weights_path=s.dinov2_weights, allow_random_weights=s.allow_random_weights, device=device)
    return nets


def _check_sizes(s, nets, batches):
    if not s.min_samples or all(getattr(net, "random_weights", False) for net in nets.values()):
        return
    for images in batches:
        if images.num_images < s.min_samples:
            raise ValueError(
                f"{images.path} holds {images.num_images} images, fewer than the minimum of {s.min_samples}: with so "
                "few the scores are estimation error (published numbers use 50,000 samples); evaluate more, or "
                f"pass --min-samples {images.num_images} (min_samples={images.num_images}) to score them anyway")


def _scores(s, nets, batches, feats):
    """The requested metrics, each with the mark of the network that computed it; and how they were computed:
    ``(result, details)``, details holding each batch's ``statistics_from`` and the precision/recall blocks."""
    result, details, fns = {}, {}, {}  # fns: each metric recomputed on a resample of the samples (bootstrap)
    if "inception" in nets:
        ref, sample = feats["ref"]["inception"], feats["sample"]["inception"]
        if "fid" in s.metrics or "sfid" in s.metrics:
            (ref_stats, details["ref"]), (sample_stats, details["sample"]) = (
                fid_statistics(batches[name][1], feats[name]["inception"], batches[name][0].path)
                for name in ("ref", "sample"))
        for key, suffix, output in (("fid", "", "pool"), ("sfid", "_s", "spatial")):
            if key in s.metrics:
                mu, sigma = ref_stats["mu" + suffix], ref_stats["sigma" + suffix]
                result[key] = frechet_distance(sample_stats["mu" + suffix], sample_stats["sigma" + suffix], mu, sigma)
                fns[key] = frechet_fn(sample.get(output), mu, sigma)  # spatial: kept only for the bootstrap
        if "is" in s.metrics:
            result["inception_score"] = inception_score(sample["logits"], split_size=s.split_size)
            fns["inception_score"] = inception_score_fn(sample["logits"], s.split_size)
        if "pr" in s.metrics:
            blocks = []
            pr_options = {"k": s.k, "device": nets["inception"].device, "pr_precision": s.pr_precision}
            members = manifold_memberships(ref["pool"], sample["pool"], block_log=blocks, **pr_options)
            result["precision"] = float(members.sample_in_ref.mean())
            result["recall"] = float(members.ref_in_sample.mean())
            details["pr_blocks"] = {p: sum(b[3] == p for b in blocks) for p in PR_PRECISIONS}
            fns.update(precision_recall_fns(ref["pool"], sample["pool"], members, **pr_options))
    if "dinov2" in nets:
        ref, sample = feats["ref"]["dinov2"], feats["sample"]["dinov2"]
        result["fd_dinov2"] = frechet_distance(sample["mu"], sample["sigma"], ref["mu"], ref["sigma"])
    result["marks"] = {key: nets[METRICS_BY_KEY[key].network].marker for key in result}  # the mark beside each
    if s.bootstrap:
        result["bootstrap"] = bootstrap(fns, feats["sample"]["inception"]["num_images"], s.bootstrap,
                                        s.bootstrap_seed, values_of_all={key: result[key] for key in fns})
    if "pr" in s.metrics:
        result["pr_precision"] = s.pr_precision
    return result, details


def _provenance(s, nets, batches, feats, details, dist, started):
    """Everything of a result beside the metrics: inputs, networks, settings, versions, marks."""
    inception, dinov2 = nets.get("inception"), nets.get("dinov2")
    random_nets = [name for name, net in (("Inception", inception), ("DINOv2", dinov2))
                   if net is not None and net.random_weights]
    out = {
        "format": RESULT_FORMAT,
        "metrics": list(s.metrics),
        "random_weights": bool(random_nets),
        # The row's mark (tables): the Inception extractor's, else RANDOM-WEIGHTS when DINOv2's weights are.
        "marker": (inception.marker if inception is not None else None) or (
            RANDOM_WEIGHTS_MARK if random_nets else None),
        "extractor": inception.id if inception is not None else None,
        "inception_weights": inception.weights_path if inception is not None else None,
        "settings": dict({"batch_size": s.batch_size, "split_size": s.split_size, "k": s.k,
                          "device": str(next(iter(nets.values())).device), "processes": dist.world_size},
                         **({"pr_blocks": details["pr_blocks"]} if "pr_blocks" in details else {})),
        "versions": {name: importlib.import_module(name).__version__
                     for name in ("torch", "torch_fidelity", "numpy", "scipy") + (("timm",) * (dinov2 is not None))},
        "seconds": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name, (images, _) in batches.items():
        got = feats[name]
        out[name] = {"path": os.path.abspath(images.path), "bytes": os.path.getsize(images.path),
                     "num_images": images.num_images, "image_shape": list(images.shape[1:]),
                     "sha256": next(iter(got.values()))["sha256"], "statistics_from": details.get(name),
                     "features_from_cache": bool(got.get("inception", {}).get("from_cache"))}
        if dinov2 is not None:
            out[name]["dinov2_statistics_from_cache"] = bool(got["dinov2"]["from_cache"])
    if dinov2 is not None:
        out["dinov2"] = {"extractor": dinov2.id, "model": dinov2.model_name, "weights": dinov2.weights_path,
                         "random_weights": dinov2.random_weights, "marker": dinov2.marker}
    if random_nets:
        out["warning"] = (f"{RANDOM_WEIGHTS_MARK}: computed with a randomly initialised {' and '.join(random_nets)} "
                          "network; the numbers marked so mean nothing and must not be compared with anything")
    return out


def write_result(path, result):
    """The one writer of evaluation results (``--json``, ``evaluate(json_path=)``, a sweep cell's ``eval.json``):
    indented JSON, keys sorted, numpy numbers as floats, atomic (a symbolic link at ``path`` is replaced, not
    followed)."""
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")


def result_marker(result):
    """The mark of a result dict (RANDOM-WEIGHTS, DEMO-FEATURES or None), also for results written before
    results carried a ``marker``."""
    return result.get("marker") or (RANDOM_WEIGHTS_MARK if result.get("random_weights") else None)


def format_lines(result):
    """The upstream evaluator's lines of the metrics the result holds, then ``FD_DINOv2: ``; each with its network's
    mark (RANDOM-WEIGHTS, DEMO-FEATURES) when it has one."""
    marks = result.get("marks")
    marks = marks if isinstance(marks, dict) else dict.fromkeys(result, result_marker(result))
    return [f"{METRICS_BY_KEY[key].label}: {float(result[key])!r}" + (f"  [{marks[key]}]" if marks.get(key) else "")
            for key in METRIC_KEYS + ("fd_dinov2",) if key in result]


def format_bootstrap_lines(result):
    """One line per metric of the result's bootstrap interval, after :func:`format_lines`' (which stay upstream's,
    for the scripts that parse them)."""
    intervals = result.get("bootstrap")
    if not intervals:
        return []
    head = (f"bootstrap ({intervals['k']} resamples, seed {intervals['seed']}, std and {intervals['level']:.0%} "
            "interval)")
    return [f"{head} {METRICS_BY_KEY[key].label}: \u00b1 {v['std']!r} [{v['low']!r}, {v['high']!r}]"
            for key in METRIC_KEYS if isinstance(v := intervals.get(key), dict)]


def build_parser():
    p = FlagParser(separator="-", description="ADM-compatible evaluator: IS, FID, sFID, precision, recall.")
    p.add_argument("ref_batch", help="reference batch npz (arr_0: uint8 N x H x W x 3; optional mu/sigma/mu_s/sigma_s)")
    p.add_argument("sample_batch", help="sample batch npz (arr_0: uint8 N x H x W x 3)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics and the inputs' details as JSON")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    p.add_argument("--allow-random-weights", action="store_true",
                   help="without weights, use a randomly initialised network (tests, dry runs; numbers meaningless)")
    p.add_argument("--cache-dir", help="feature/statistics cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.add_argument("--cache-samples", action="store_true", help="cache the sample batch's features too")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--feature-net", metavar="PATH",
                   help="use a custom feature network instead of Inception (default loader: the CPU demo's, "
                        "numbers marked DEMO-FEATURES)")
    p.add_argument("--feature-extractor", metavar="MODULE:CLASS",
                   help="the class that loads --feature-net (default: %(default)s)")
    p.add_argument("--metrics", help=f"comma-separated, among {','.join(METRICS)} (default: %(default)s)")
    p.add_argument("--pr-precision", choices=PR_PRECISIONS,
                   help="precision/recall distances: float16 blocks with float32 fallback as OpenAI's evaluator "
                        "(default), or float32 throughout")
    p.add_argument("--min-samples", type=int, metavar="N",
                   help="refuse batches of fewer images (default: %(default)s; 0: score any size; random-weight "
                        "networks are exempt)")
    p.add_argument("--dinov2-weights", metavar="PATH",
                   help="DINOv2 ViT-L/14 checkpoint dinov2_vitl14_pretrain.pth for fd_dinov2 (default: torch hub "
                        "cache; make download-dinov2)")
    p.add_argument("--bootstrap", type=int, metavar="K",
                   help="also report a bootstrap interval of FID, sFID, IS, precision and recall from K resamples "
                        "of the samples' features, the reference fixed (K >= 2; costs about K FID/sFID "
                        "computations, see docs/evaluation.md)")
    p.add_argument("--bootstrap-seed", type=int, metavar="S",
                   help="seed of the bootstrap's draws (default: %(default)s)")
    # The defaults are EvaluationSettings' (one place); --metrics shows its parsed default.
    defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(EvaluationSettings)}
    p.set_defaults(**dict(defaults, metrics=",".join(DEFAULT_METRICS)))
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        dist = detect_distributed()
    except (DistSetupError, ValueError) as e:  # the rendezvous does not answer, a bad PAG_DIST_* value
        print(f"[rank {rank_from_env()}] error: {e}", file=sys.stderr)
        return 2
    options = {key: value for key, value in vars(args).items() if key in EVALUATION_OPTIONS}  # same names
    options.update(cache_dir=None if args.no_cache else args.cache_dir, progress=not args.no_progress)
    try:
        result = evaluate(args.ref_batch, args.sample_batch, json_path=args.json, dist=dist, **options)
    except (MissingInceptionWeights, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.close()  # a process group made for this evaluation ends with it
    if result is None:  # not rank 0
        return 0
    if result["random_weights"]:
        print(f"WARNING: {result['warning']}")
    for line in format_lines(result) + format_bootstrap_lines(result):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
