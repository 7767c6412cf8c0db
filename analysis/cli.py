"""``scripts/analyze.py``: the sampling flags (model, guidance, sampler, seed) plus what to analyse (docs/analysis.md;
``make analyze-demo``). Writes results/analysis/<name>/summary.md and the files it links. Exit status: 0 done, 2 bad
input."""

import os
import shlex
import sys

from pag.perturbations import perturbation_names
from sampling.cli import build_sample_parser
from sampling.settings import SampleConfigError, read_yaml_mapping, resolve_settings

ANALYSIS_FLAGS = ("name", "analysis_dir", "indices", "curve_samples", "kinds", "compare_kinds", "shown_steps",
                  "blocks", "queries")


def build_parser():
    parser = build_sample_parser()
    parser.description = ("Per-step analysis of guided sampling: guidance terms, predicted x0 of the clean and the "
                          "perturbed pass, attention maps and entropies, per perturbation kind. Takes every flag "
                          "of scripts/image_sample.py (model, guidance, sampler, seed) plus the analysis flags.")
    group = parser.add_argument_group("analysis")
    group.add_argument("--name", default="", help="results go to <analysis_dir>/<name>/, or to --out_dir when "
                                                   "given (default name: from the model and the PAG scale)")
    group.add_argument("--analysis_dir", default=os.path.join("results", "analysis"))
    group.add_argument("--indices", default="0,1,2,3",
                       help="sample indices with strips and attention maps (the sampler's seeds: sample i is "
                            "sample i of a sampling run with the same settings); ranges like 0-3 allowed")
    group.add_argument("--curve_samples", type=int, default=0,
                       help="curves average over --indices and samples 0..N-1 (default: --indices only)")
    group.add_argument("--kinds", default="", help="perturbation kinds analysed in full, comma-separated "
                                                   "(default: --perturbation)")
    group.add_argument("--compare_kinds", default="",
                       help="kinds whose perturbed x0 is shown side by side on the first kind's trajectory, "
                            "comma-separated, or 'all' (" + ", ".join(perturbation_names()) + ")")
    group.add_argument("--shown_steps", type=int, default=8, help="steps with images and attention maps")
    group.add_argument("--blocks", default="", help="attention blocks for entropies and maps (names or globs; "
                                                     "default: all)")
    group.add_argument("--queries", type=int, default=3, help="query tokens per attention map (1 to 4)")
    return parser


def parse_indices(text):
    """``"0,1,5-7"`` -> [0, 1, 5, 6, 7] (order kept, duplicates dropped)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise SampleConfigError(f"--indices: {part!r} is not an index or a range like 0-3") from None
        out += [v for v in values if v not in out]
    if not out or min(out) < 0:
        raise SampleConfigError(f"--indices must list sample indices >= 0, got {text!r}")
    return out


def _kinds(text, default):
    if text.strip() == "all":
        return list(perturbation_names())
    kinds = [k.strip() for k in text.split(",") if k.strip()] or list(default)
    unknown = [k for k in kinds if k not in perturbation_names()]
    if unknown:
        raise SampleConfigError(f"unknown perturbation kind(s) {', '.join(unknown)}; known: "
                                + ", ".join(perturbation_names()))
    return kinds


def resolve(argv=None):
    """(settings, analysis options) of a command line."""
    given = vars(build_parser().parse_args(argv))
    opts = {k: given.pop(k) for k in ANALYSIS_FLAGS}
    config = given.pop("config", None)
    indices = parse_indices(opts["indices"])
    if opts["curve_samples"] < 0 or not 1 <= opts["queries"] <= 4 or opts["shown_steps"] < 1:
        raise SampleConfigError("--curve_samples must be >= 0, --queries 1 to 4, --shown_steps >= 1")
    given.setdefault("num_samples", max(indices + [opts["curve_samples"] - 1]) + 1)
    layers = [(f"--config {config}", read_yaml_mapping(config))] if config else []
    layers.append(("the command line", given))
    given_out = "out_dir" in given
    probe = resolve_settings(layers if given_out else layers + [("analysis", {"out_dir": "-"})])
    name = opts["name"] or "{}_pag{:g}".format(
        os.path.splitext(os.path.basename(probe.runtime.model or probe.model.model_path))[0],
        probe.guidance.pag_scale)
    out_dir = probe.runtime.out_dir if given_out else os.path.join(opts["analysis_dir"], name)
    settings = probe if given_out else resolve_settings(layers + [("analysis", {"out_dir": out_dir})])
    opts.update(name=name, out_dir=out_dir, indices=indices,
                kinds=_kinds(opts["kinds"], [settings.guidance.perturbation]),
                compare_kinds=_kinds(opts["compare_kinds"], []) if opts["compare_kinds"] else [],
                blocks=[b for b in opts["blocks"].split(",") if b.strip()] or None)
    return settings, opts


def main(argv=None):
    from sampling.models import load_models
    from sampling.process import resolve_device, tune_cpu_allocator

    from . import TraceOptions, analyze

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings, opts = resolve(argv)
        device = resolve_device(settings)
        if device.type == "cpu":
            tune_cpu_allocator()
        models = load_models(settings, device)
        options = TraceOptions(shown_steps=opts["shown_steps"], blocks=opts["blocks"], queries=opts["queries"])
        result = analyze(settings, models, device, opts["out_dir"], opts["indices"], kinds=opts["kinds"],
                         compare_kinds=opts["compare_kinds"], curve_samples=opts["curve_samples"], options=options,
                         name=opts["name"], command="python scripts/analyze.py " + shlex.join(argv))
    except (SampleConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {result['summary']} ({result['seconds']:.1f} s)")
    return 0
