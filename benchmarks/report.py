"""The GPU check's report (the dict written to ``report.json``) as Markdown (``report.md``)."""

from evaluations.table import markdown_table as table

from .health import health_methods
from .models import ARCHS


def _fmt(value, spec=".1f"):
    return "-" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def to_markdown(report):
    d = report["device"]
    lines = [f"# GPU acceptance check ({'GPU' if d['gpu'] else 'CPU'}{', tiny widths' if report['tiny'] else ''})",
             ""]
    if not d["gpu"]:
        lines += ["**No GPU: this report was not run on a GPU.** Its figures are CPU figures"
                  + (" at tiny widths" if report["tiny"] else "") + "; the GPU goals are not measured.", ""]
    lines += [f"Device: {d['name']} ({d['type']}), torch {d['torch']}"
              + (f", CUDA {d.get('cuda')}, {d.get('memory_gib')} GiB" if d["gpu"] else "")
              + f". Peak: {_fmt(d.get('peak_fp16_tflops'), '.0f')} TFLOP/s ({d['peak_note']}).",
              f"Created {report['created']}, {report['elapsed_s']:.0f} s. Verdict: "
              f"**{'PASS' if report['ok'] else 'FAIL'}** (correctness; speed goals below are reported).", ""]
    if "health" in report:
        h = report["health"]
        bad = [c for c in h["cases"] if not c["ok"]]
        groups = {}
        for c in h["cases"]:
            groups.setdefault((c["arch"], c["method"]), []).append(c)
        lines += [f"## 1. {h['dtype']} health", "",
                  f"{len(h['cases'])} cases ({len(bad)} failed): {', '.join(ARCHS)} x "
                  f"{len(health_methods())} methods x t in {h['timesteps']}, batch {h['batch']}; "
                  f"weights: {', '.join(f'{k}: {v}' for k, v in h['weights'].items())}.",
                  f"Tolerance (relative RMS of eps vs float32): unguided {h['tolerance']['unguided']}, "
                  f"guided {h['tolerance']['guided']}. Why: {h['tolerance_why']}", ""]
        lines += table(["model", "method", "worst rel. RMS", "max abs attention output", "ok"],
                       [(arch, method, _fmt(max((c["rel_rms"] for c in cs if c["rel_rms"] is not None), default=None),
                                            ".2e"),
                         _fmt(max(c["max_abs_attention_output"] for c in cs), ".3g"),
                         "yes" if all(c["ok"] for c in cs) else "**NO**") for (arch, method), cs in groups.items()])
        for c in bad:
            lines.append(f"- FAILED: {c['arch']} {c['method']} t={c['t']}: finite eps {c['finite_eps']}, "
                         f"non-finite attention blocks {c['nonfinite_attention_blocks']}, rel. RMS {c['rel_rms']}")
        lines.append("")
    if "speed" in report:
        s = report["speed"]
        lines += ["## 2. Speed per guided step", "",
                  f"{s['arch']}, {s['dtype']}, PAG s = {s['pag_scale']} on {', '.join(s['layers'])}, t = "
                  f"{s['timestep']}; median of {s['repeats']} after {s['warmup']} warm-up. {s['note']}.", ""]
        lines += table(["batch", "variant", "ms/step", "img/s (DDIM-25)", "peak MiB", "GFLOP", "TFLOP/s",
                        "share of peak"],
                       [(r["batch"], r["variant"], _fmt(r["ms_per_step"], ".2f"), _fmt(r["images_per_s_ddim25"], ".2f"),
                         _fmt(r["peak_mib"], ".0f"), _fmt(r["gflop"]), _fmt(r["tflops_per_s"], ".3f"),
                         _fmt(r["peak_share"], ".1%").replace("%", " %") + (" " + r["error"] if r["error"] else ""))
                        for r in s["rows"]])
        lines += ["", "Execution options (unguided and engine step):", ""]
        lines += table(["option", "batch", "unguided ms", "engine ms", "engine / unguided", "unguided TFLOP/s",
                        "share of peak"],
                       [(o["option"], o["batch"], _fmt(o["unguided_ms"], ".2f"), _fmt(o["engine_ms"], ".2f"),
                         _fmt(o["engine_vs_unguided"], ".3f"), _fmt(o["tflops_per_s"], ".3f"),
                         _fmt(o["peak_share"], ".1%").replace("%", " %") + (f" ({o['error']})" if o["error"] else ""))
                        for o in s["options"]])
        lines.append("")
    if "goals" in report:
        rows = []
        for g in report["goals"]:
            value = _fmt(g["value"], ".3f") + (f" ({g['best_option']})" if g.get("best_option") else "")
            if g.get("cpu_value") is not None:
                value = f"- (this CPU at batch {g['batch']}: {g['cpu_value']:.3f})"
            rows.append((g["what"], g["target"], value, g["status"]))
        lines += ["## Goals (issue 14)", ""] + table(["goal", "target", "value", "status"], rows) + [""]
    if "sampler" in report:
        r = report["sampler"]
        lines += ["## 3. Sampler end to end", "", f"`{r['command']}` (run twice)", ""]
        if "checks" in r:
            lines += [f"- first run: {r['first_run_s']:.1f} s ({r['images_per_s']:.2f} img/s including model load), "
                      f"second run {r['second_run_s']:.1f} s, a no-op: {r['resume_noop']}",
                      f"- npz: {r['npz']['file']}, arrays {r['npz']['arrays']}, images {r['npz']['shape']} "
                      f"{r['npz']['dtype']}, labels {r['npz']['labels_shape']} {r['npz']['labels_dtype']}",
                      f"- host synchronisations per step by batch size: {r['host_syncs_per_step']} "
                      f"({r['host_syncs_method']})",
                      f"- checks: {', '.join(f'{k} {v}' for k, v in r['checks'].items())}"]
        else:
            lines.append(f"- FAILED: {r.get('error')}")
        lines.append("")
    if "features" in report:
        f = report["features"]
        lines += ["## 4. Evaluator feature extraction", "",
                  f"Inception (torch-fidelity inception-v3-compat){' **' + f['marker'] + '**' if f['marker'] else ''}"
                  f": {f['images_per_s']:.1f} images/s at batch {f['batch']} ({f['image_size']}x{f['image_size']} "
                  f"uint8 in, {f['ms_per_batch']:.1f} ms per batch). {f['note']}.", ""]
    for section, error in report.get("errors", {}).items():
        lines.append(f"- section {section} FAILED: {error}")
    return "\n".join(lines).rstrip() + "\n"
