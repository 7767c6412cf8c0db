"""See why PAG works: per-step guidance terms, predicted x0 of the clean and perturbed passes, attention maps and
entropies, for each perturbation kind (``scripts/analyze.py``; ``make analyze-demo``).

    settings = sampling.resolve_settings([("mine", {"model": "checkpoints/demo/adm_demo.yaml", "out_dir": "-",
                                                    "pag_scale": 2.0, "pag_layers": "middle_block.1",
                                                    "timestep_respacing": "ddim25", "use_ddim": True})])
    models = sampling.load_models(settings, "cpu")
    analysis.analyze(settings, models, "cpu", "results/analysis/mine", indices=[0, 1], kinds=["identity", "seg"])

``analysis.trace`` records (one guided sampling run per kind, the sampler's seeds); ``analysis.report`` writes.
"""

import dataclasses
import os
import time

from . import report
from .trace import Trace, TraceOptions, perturbed_x0, trace

__all__ = ["Trace", "TraceOptions", "analyze", "perturbed_x0", "report", "trace"]


def analyze(settings, models, device, out_dir, indices, kinds=None, compare_kinds=(), curve_samples=0,
            options=None, name=None, command=""):
    """Write the analysis of ``indices`` (strips, attention maps) for each perturbation kind of ``kinds``
    (default: the settings' own) under ``out_dir``/<kind>/, curves averaged over ``indices`` and samples
    0 .. curve_samples-1, the side-by-side x0 of ``compare_kinds`` on the first kind's trajectory, and
    ``out_dir``/summary.md linking everything. Returns {"traces", "files", "summary", "seconds"}."""
    start = time.perf_counter()
    kinds = list(kinds or [settings.guidance.perturbation])
    strip = [int(i) for i in indices]
    traced = strip + sorted(set(range(curve_samples)) - set(strip))
    opts = dataclasses.replace(options or TraceOptions(), strip_rows=list(range(len(strip))))
    os.makedirs(out_dir, exist_ok=True)
    traces, files = {}, {}
    for kind in kinds:
        config = dataclasses.replace(settings.guidance, perturbation=kind)
        result = trace(settings, models, device, traced, config=config, options=opts)
        kind_dir = os.path.join(out_dir, kind)  # made by the atomic writers
        title = f"{kind}, s={config.pag_scale:g}"
        paths = []
        for row, index in enumerate(strip):
            paths.append(report.write_strip(result, row, os.path.join(kind_dir, f"strip_{index}.png"),
                                            title=f"{title}: sample {index}"))
            if result.maps:
                paths.append(report.write_attention_maps(
                    result, row, os.path.join(kind_dir, f"attention_{index}.png"), title=f"{title}: sample {index}"))
        paths += report.write_curves(result, kind_dir, title=title)
        if result.entropy:
            paths += report.write_entropy(result, kind_dir, title=title)
        traces[kind], files[kind] = result, [os.path.relpath(p, out_dir) for p in paths]
    comparison = []
    if compare_kinds:
        reference = traces[kinds[0]]
        x0 = perturbed_x0(settings, models, device, reference, compare_kinds)
        for row, index in enumerate(strip):
            comparison.append(report.write_kind_comparison(
                reference, x0, row, os.path.join(out_dir, f"compare_x0_{index}.png"),
                title=f"sample {index}: perturbed-pass x0 of each kind on the x_t of the {kinds[0]} run"))
        comparison.append(report.write_kind_change(reference, x0, out_dir))
    if len(traces) > 1:
        comparison += report.write_compare_curves(traces, out_dir)
    comparison = [os.path.relpath(p, out_dir) for p in comparison]
    seconds = time.perf_counter() - start
    summary = os.path.join(out_dir, "summary.md")
    report.atomic_write_text(summary, report.summary_markdown(name or os.path.basename(out_dir.rstrip("/")), command,
                                                              traces, files, comparison, seconds))
    return {"traces": traces, "files": files, "comparison": comparison, "summary": summary, "seconds": seconds}
