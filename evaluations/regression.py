"""``make check-evaluator``: the ADM evaluator's regression pair through our evaluator.

guided-diffusion's ``evaluations/README.md`` evaluates ``admnet_guided_upsampled_imagenet256.npz`` against
``VIRTUAL_imagenet256_labeled.npz`` with its TensorFlow evaluator and publishes the five numbers below. When the
two files and the Inception weights are present, this evaluates the pair and prints our numbers, the upstream
ones, the differences and the differences expected of a torch-fidelity-based port; otherwise it says what is
missing and how to get it.

Exit status: 0 all within the expected differences, 1 some outside, 2 inputs missing.
"""

import argparse
import os
import sys

from evaluations.evaluator import evaluate
from evaluations.metrics import METRIC_KEYS, METRICS_BY_KEY
from evaluations.features import WEIGHTS, WEIGHTS_FILENAME, WEIGHTS_URL
from evaluations.reference import default_cache_dir
from adm_common.flags import FlagParser

_BASE = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
REF_FILE = "VIRTUAL_imagenet256_labeled.npz"
SAMPLE_FILE = "admnet_guided_upsampled_imagenet256.npz"
DEFAULT_DIR = os.path.join("downloads", "refs")

# guided-diffusion evaluations/README.md: the TensorFlow evaluator's output on the pair above.
UPSTREAM = {"inception_score": 215.8370361328125, "fid": 3.9425574129223264, "sfid": 6.140433703346162,
            "precision": 0.8265, "recall": 0.5309}
# How far a torch-fidelity-based PyTorch port lands from those (published for such a port; not measured here).
EXPECTED_DELTA = {"inception_score": 0.15, "fid": 0.002, "sfid": 0.001, "precision": 0.001, "recall": 0.0025}


def missing_inputs(ref, sample, weights):
    """Lines describing each missing input and how to get it; empty when all are present."""
    inputs = ((ref, ref, 'download-refs REFS="imagenet256"', _BASE + REF_FILE),
              (sample, sample, 'download-refs REFS="admnet_guided_upsampled_imagenet256"', _BASE + SAMPLE_FILE),
              (weights, f"Inception weights {weights} ({WEIGHTS_FILENAME})", "download-inception", WEIGHTS_URL))
    return [f"missing {what}\n    get it with: make {make}\n    or download {url}"
            for path, what, make, url in inputs if not os.path.isfile(path)]


def compare(result):
    """Rows ``(key, ours, upstream, delta, expected, within)``."""
    rows = []
    for key in METRIC_KEYS:
        ours = float(result[key])
        delta = ours - UPSTREAM[key]
        rows.append((key, ours, UPSTREAM[key], delta, EXPECTED_DELTA[key], abs(delta) <= EXPECTED_DELTA[key]))
    return rows


def format_comparison(rows):
    out = [f"{'metric':<16} {'ours':>20} {'upstream (TF)':>20} {'difference':>12} {'expected |diff|':>16}"]
    for key, ours, upstream, delta, expected, within in rows:
        out.append(f"{METRICS_BY_KEY[key].label:<16} {ours:>20.10g} {upstream:>20.10g} {delta:>+12.5f} "
                   f"{'<= ' + format(expected, 'g'):>16}  {'ok' if within else 'OUTSIDE'}")
    return "\n".join(out)


def main(argv=None):
    p = FlagParser(separator="-", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default=os.path.join(DEFAULT_DIR, REF_FILE))
    p.add_argument("--sample", default=os.path.join(DEFAULT_DIR, SAMPLE_FILE))
    p.add_argument("--inception-weights", default=None, help=f"default: {WEIGHTS.default_path()}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=default_cache_dir())
    p.add_argument("--json", metavar="PATH", help="also write our result as JSON")
    args = p.parse_args(argv)

    weights = os.path.expanduser(args.inception_weights) if args.inception_weights else WEIGHTS.default_path()
    missing = missing_inputs(args.ref, args.sample, weights)
    if missing:
        print("check-evaluator: cannot run the regression pair; missing inputs:\n" + "\n".join(missing))
        return 2
    result = evaluate(args.ref, args.sample, batch_size=args.batch_size, device=args.device,
                      inception_weights=weights, cache_dir=args.cache_dir, json_path=args.json)
    if result is None:
        return 0
    rows = compare(result)
    print(format_comparison(rows))
    ok = all(r[-1] for r in rows)
    print("check-evaluator: " + ("all within the expected differences" if ok else
                                 "some metrics are OUTSIDE the expected differences"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
