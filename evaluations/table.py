"""Tables (Markdown, CSV, LaTeX) and plots of many runs' evaluation results, one table per experiment: rows grouped by
values the run record stores (read, never derived here), an experiment's published ``anchors:`` below ours
(docs/evaluation.md, "Tables and plots").
"""

import csv
import io
import json
import math
import os
import re
import sys

from adm_common.files import atomic_open, atomic_write_text, read_json_mapping
from adm_common.flags import FlagParser
from adm_common.yaml_files import parse_yaml, read_yaml
from evaluations.evaluator import RESULT_FORMAT, result_marker
from evaluations.features import DEMO_FEATURES_MARK, RANDOM_WEIGHTS_MARK
from evaluations.metrics import METRIC_KEYS, METRIC_TABLE, METRICS_BY_KEY
# ROW_METRICS: upstream's five, and FD_DINOv2 (a column when a row has it)
from evaluations.uncertainty import MINIMUM_METRICS, ROW_METRICS, aggregate_seeds, bootstrap_stds, min_key, std_key

DEFAULT_GROUP_BY = ("pag_scale", "pag_layers", "perturbation", "sampler")
TABLE_METRICS = tuple(m.key for m in METRIC_TABLE if m.key in METRIC_KEYS)  # the order of published tables
# An anchor's metric names in any usual spelling (letters only, lower case): key, label, column header, aliases.
_METRIC_ALIASES = {re.sub(r"[^a-z]", "", name.lower()): m.key for m in METRIC_TABLE
                   for name in (m.key, m.label, m.header) + m.aliases}
PR_FLOAT32_MARK = "PR-FLOAT32"


# --------------------------------------------------------------------------------------------------------------
# loading runs


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_result(obj):
    return isinstance(obj, dict) and (obj.get("format") == RESULT_FORMAT or all(k in obj for k in METRIC_KEYS))


def _first_result(directory):
    """The first evaluator JSON in ``directory`` (``eval.json`` first), or None."""
    for name in sorted((n for n in os.listdir(directory) if n.endswith(".json")), key=lambda n: (n != "eval.json", n)):
        if _is_result(read_json_mapping(os.path.join(directory, name))):  # {} when unreadable or not JSON
            return os.path.join(directory, name)
    return None


def find_result_files(path):
    """Evaluator JSON files at ``path``: the file itself, or the directory's (``eval.json`` first), or, when the
    directory has none, one per subdirectory holding one (a directory of runs)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such run directory or result file: {path}")
    found = []
    for root, dirs, _ in os.walk(path):  # top-down: ``path`` itself first
        dirs.sort()
        own = _first_result(root)
        if own and root == path:
            return [own]
        if own:
            found.append(own)
    if not found:
        raise FileNotFoundError(f"no evaluator result (*.json with '{RESULT_FORMAT}') in {path} or below")
    return found


def _load_config(json_path):
    here = os.path.dirname(os.path.abspath(json_path))
    for directory in (here, os.path.dirname(here)):
        for name in ("config.yaml", "config.yml"):
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return read_yaml(candidate, "run config"), candidate
    return {}, None


def _flatten(cfg, prefix=""):
    flat = {}
    for key, value in cfg.items():
        flat.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _lookup(flat, key):
    return flat[key] if key in flat else next((v for k, v in flat.items() if k.endswith("." + key)), None)


# Settings that mean nothing when PAG is off (pag_scale 0): shown as "-" rather than their defaults.
_PAG_ONLY_KEYS = ("pag_layers", "perturbation")


def _group_value(flat, key):
    if key in _PAG_ONLY_KEYS and _lookup(flat, "pag_scale") in (0, 0.0):
        return "-"
    # The sampler column: the run record's ``sampler_label`` (the sampler alone derives it), or a ``sampler`` named
    # by hand (anchors); "?" for a record from before labels that names sampling settings but no label.
    value = _lookup(flat, key) if key != "sampler" else next(
        (v for k in ("sampler_label", "sampler") if (v := _lookup(flat, k)) is not None),
        "?" if any(_lookup(flat, k) is not None for k in ("use_ddim", "timestep_respacing")) else None)
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return value


def row_from_result(result, run, experiment, values, group_by=DEFAULT_GROUP_BY, json_path=None, config_path=None):
    """One table row from an evaluator result and what the caller knows of the run: ``values`` maps setting names
    (``pag_scale``, ``pag_layers``, ``perturbation``, ``sampler``, ...) to the run's values. The sweep calls this
    with each cell's settings; :func:`load_run` with what it reads from a run directory."""
    where = json_path or run
    if not _is_result(result):
        raise ValueError(f"{where} is not an evaluator result (needs {', '.join(METRIC_KEYS)})")
    for key in ROW_METRICS:  # a result may hold a subset (evaluate(metrics=...)); absent ones show as "-"
        if key in result and not _is_number(result[key]):
            raise ValueError(f"{where}: {key} is not a number: {result[key]!r}")
    row = {"run": run, "experiment": str(experiment), "source": "ours", "json": json_path, "config": config_path,
           "random_weights": bool(result.get("random_weights")), "marker": result_marker(result),
           "num_samples": (result.get("sample") or {}).get("num_images")}
    row.update((key, _group_value(values, key)) for key in group_by)
    for key in ROW_METRICS:
        row[key] = float(result[key]) if key in result else None
    row["pr_precision"] = result.get("pr_precision")  # "float32": named in the table
    row.update(bootstrap_stds(result))  # a seed row's std over seeds replaces these (aggregate_seeds)
    return row


def load_run(path, group_by=DEFAULT_GROUP_BY):
    """One row from a run directory (or result file) on disk: metrics from its JSON, group values from the
    ``config.yaml`` beside it (a sampling run record, or any mapping; nested mappings are searched)."""
    json_path = find_result_files(path)[0] if os.path.isdir(path) else os.fspath(path)
    with open(json_path) as f:
        try:
            result = json.load(f)
        except ValueError as e:
            raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    cfg, cfg_path = _load_config(json_path)
    flat = _flatten(cfg)
    run_dir = os.path.dirname(os.path.abspath(json_path))
    experiment = _lookup(flat, "experiment")
    if experiment is None:  # an empty name is a name
        experiment = os.path.basename(os.path.dirname(run_dir)) or "experiment"
    return row_from_result(result, os.path.basename(run_dir), experiment, flat, group_by, json_path, cfg_path)


def normalise_anchor(anchor, group_by=DEFAULT_GROUP_BY):
    """A published-anchor dict (metric names in any usual spelling: FID, sFID, IS, Precision, Recall) -> row."""
    if not isinstance(anchor, dict):
        raise ValueError(f"an anchor must be a mapping, got {anchor!r}")
    row = {"run": next((str(anchor[k]) for k in ("label", "name", "method", "model") if anchor.get(k) is not None),
                       "published"),
           "source": f"published ({anchor['source']})" if anchor.get("source") else "published",
           "random_weights": False, "num_samples": None}
    for key, value in anchor.items():
        canon = _METRIC_ALIASES.get(re.sub(r"[^a-z]", "", str(key).lower()))
        if canon:
            row[canon] = None if value in (None, "-", "") else float(value)
    flat = _flatten(anchor)
    row.update((key, _group_value(flat, key)) for key in group_by)
    row.update((k, row.get(k)) for k in ROW_METRICS)
    if all(row[k] is None for k in ROW_METRICS):
        raise ValueError(f"anchor {anchor!r} has none of the metrics {', '.join(m.header for m in METRIC_TABLE)}")
    return row


# --------------------------------------------------------------------------------------------------------------
# rendering


def _sort_key(row, group_by, scale_key=None):
    """Blocks of equal non-scale group values (in ``group_by`` order), the scale ascending inside a block."""
    order = [g for g in group_by if g != scale_key] + ([scale_key] if scale_key else [])
    return [(2, 0, "") if v is None else (0, float(v), "") if _is_number(v) else (1, 0, str(v))
            for v in (row.get(g) for g in order)]


_MIN_COLUMNS = {min_key(m): m for m in MINIMUM_METRICS}  # "fid_min" -> "fid"


def _fmt_value(value):
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _columns(rows, group_by):
    groups = [g for g in group_by if any(r.get(g) is not None for r in rows)]
    extra = [m for m in ROW_METRICS if m not in TABLE_METRICS and any(r.get(m) is not None for r in rows)]
    minima = [c for c, m in _MIN_COLUMNS.items() if m in TABLE_METRICS + tuple(extra) and
              any(r.get(c) is not None for r in rows)]
    seeds = ["seeds"] if any(r.get("seeds") for r in rows) else []
    return ["run"] + groups + list(TABLE_METRICS) + extra + minima + seeds + ["num_samples", "source"]


def _header(col):
    if col in _MIN_COLUMNS:
        return f"{METRICS_BY_KEY[_MIN_COLUMNS[col]].header} min"
    return "N" if col == "num_samples" else METRICS_BY_KEY[col].header if col in METRICS_BY_KEY else col


def _is_number_column(col):
    return col in ROW_METRICS or col in _MIN_COLUMNS or col in ("num_samples", "seeds")


def mark_best_fid(rows):
    """Flag (``row["best_fid"]``) the rows with the lowest FID among ``rows`` (every one of equals), when at least
    two of them have an FID and not all of those are equal."""
    scored = [r["fid"] for r in rows if r.get("fid") is not None and not math.isnan(r["fid"])]
    for row in rows:
        row["best_fid"] = len(set(scored)) > 1 and row.get("fid") == min(scored)


def _cell(row, col):
    if col in ROW_METRICS or col in _MIN_COLUMNS:  # a minimum column has no std
        value, std, fmt = row.get(col), row.get(std_key(col)), METRICS_BY_KEY[_MIN_COLUMNS.get(col, col)].fmt
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return fmt.format(value) + (f" \u00b1 {fmt.format(std)}" if std is not None else "")
    if col == "source":
        marks = [m for m in (row.get("marker"), PR_FLOAT32_MARK if row.get("pr_precision") == "float32" else None)
                 if m]
        return row["source"] + "".join(f" [{m}]" for m in marks)
    return _fmt_value(row.get(col))


def _notes(rows):
    notes = []
    if any(r.get("best_fid") for r in rows):
        notes.append("Bold FID: the lowest FID of our rows in this table (in a scale sweep, the best scale; past "
                     "it, stronger guidance costs more than it gives).")
    if any(r.get("seeds") for r in rows):
        notes.append("Rows with a seeds count: the mean over that many sampling seeds \u00b1 the standard deviation "
                     "of one seed's number (ddof=1)" + ("; min: the lowest over the seeds (as EDM2 reports)"
                                                          if any(r.get(c) is not None for r in rows
                                                                 for c in _MIN_COLUMNS) else "") + ".")
    boot = sorted({r["uncertainty"] for r in rows if str(r.get("uncertainty", "")).startswith("bootstrap")})
    if boot:
        notes.append(f"Other rows with \u00b1: the std of the metric over resamples of the samples' features, the "
                     f"reference fixed ({', '.join(boot)} resamples; evaluate --bootstrap K).")
    if any(r.get("random_weights") for r in rows):
        notes.append(f"{RANDOM_WEIGHTS_MARK}: rows so marked were computed with a randomly initialised Inception "
                     "network; their numbers mean nothing.")
    if any(r.get("marker") == DEMO_FEATURES_MARK for r in rows):
        notes.append(f"{DEMO_FEATURES_MARK}: rows so marked were computed with the demo's own small feature network "
                     "on its synthetic data set (FID, sFID, precision, recall and a classifier score in place of "
                     "IS); they are not Inception metrics and are not comparable with published numbers.")
    if any(r.get("pr_precision") == "float32" for r in rows):
        notes.append(f"{PR_FLOAT32_MARK}: precision and recall of rows so marked were computed with float32 "
                     "distances throughout (--pr-precision float32), not with the float16 distance blocks of "
                     "OpenAI's evaluator; they differ from its numbers (by 0.001 to 0.02 in our measurements).")
    if any(r["source"] != "ours" for r in rows):
        notes.append("Published rows: numbers as reported by their source, not computed here; "
                     "ours come from this repository's evaluator.")
    return notes


def markdown_table(header, rows, right=()):
    """Markdown table lines: ``header``, the rule (the columns numbered in ``right`` right-aligned), the rows."""
    rule = "|" + "".join("---:|" if i in right else "---|" for i in range(len(header)))
    return [f"| {' | '.join(header)} |", rule] + [f"| {' | '.join(map(str, row))} |" for row in rows]


def render_markdown(rows, group_by, title=None):
    cols = _columns(rows, group_by)
    cells = [[_cell(row, c).replace("|", "\\|") for c in cols] for row in rows]
    cells = [[f"**{v}**" if c == "fid" and row.get("best_fid") else v for c, v in zip(cols, line)]
             for row, line in zip(rows, cells)]
    out = ([f"## {title}", ""] if title else []) + markdown_table(
        [_header(c) for c in cols], cells, right=[i for i, c in enumerate(cols) if _is_number_column(c)])
    notes = _notes(rows)
    out += [""] + [f"*{n}*" for n in notes] if notes else []
    return "\n".join(out) + "\n"


def render_csv(rows, group_by):
    stds = [std_key(m) for m in ROW_METRICS if any(r.get(std_key(m)) is not None for r in rows)]
    cols = _columns(rows, group_by) + stds + ["uncertainty", "random_weights", "json", "best_fid"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row.get(c) for c in cols[:-1]]
                        + [1 if row.get("best_fid") else ""])
    return buf.getvalue()


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "\u00b1": r"$\pm$"}


def latex_escape(text):
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in str(text))


def render_latex(rows, group_by, title=None):
    cols = _columns(rows, group_by)
    align = "".join("r" if _is_number_column(c) else "l" for c in cols)
    out = [r"\begin{table}[t]", r"\centering", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
           " & ".join(latex_escape(_header(c)) for c in cols) + r" \\", r"\midrule"]
    for i, row in enumerate(rows):
        if i and (row["source"] == "ours") != (rows[i - 1]["source"] == "ours"):
            out.append(r"\midrule")  # between our rows and the published ones
        cells = [latex_escape(_cell(row, c)) for c in cols]
        cells = [rf"\textbf{{{v}}}" if c == "fid" and row.get("best_fid") else v for c, v in zip(cols, cells)]
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    caption = " ".join(latex_escape(text) for text in [title or "Evaluation"] + _notes(rows))
    out += [rf"\caption{{{caption}}}", r"\end{table}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------------
# plots


def _scale_key(rows, group_by):
    for key in group_by:
        values = [r.get(key) for r in rows if r["source"] == "ours"]
        if values and all(_is_number(v) for v in values):
            return key
    return None


def _errors(rows, metric):
    """The rows' std of ``metric`` for ``errorbar`` (0 where a row has none), or None when no row has one."""
    stds = [r.get(std_key(metric)) for r in rows]
    return None if all(v is None for v in stds) else [v or 0.0 for v in stds]


def draw_plots(rows, group_by, title=None):
    """``{"_fid_is.png": Figure, "_pr.png": Figure}``: FID and IS (and FD_DINOv2 when rows have it) against the
    guidance scale (only when the rows have a numeric scale), and precision against recall; a row's std (over
    seeds, or its bootstrap's) drawn as error bars."""
    ours = [r for r in rows if r["source"] == "ours"]
    anchors = [r for r in rows if r["source"] != "ours"]
    marked = "".join(f" [{m}]" for m in sorted({r["marker"] for r in ours if r.get("marker")}))
    x_key = _scale_key(rows, group_by)
    others = [g for g in group_by if g != x_key and any(r.get(g) is not None for r in ours)]
    series_keys = [g for g in others if len({_fmt_value(r.get(g)) for r in ours}) > 1]
    constant = [f"{g}={_fmt_value(ours[0].get(g))}" for g in others if g not in series_keys] if ours else []
    heading = (title or "") + marked + (("\n" + "; ".join(constant)) if constant else "")
    series = {}
    for row in ours:
        no_pag = series_keys and all(row.get(k) is None for k in series_keys)
        name = "no PAG" if no_pag else ", ".join(f"{k}={_fmt_value(row.get(k))}" for k in series_keys) or "ours"
        series.setdefault(name, []).append(row)
    figures = {}

    if x_key is not None:
        panels = [m for m in ("fid", "inception_score", "fd_dinov2") if any(r.get(m) is not None for r in rows)
                  or m != "fd_dinov2"]
        fig = new_figure(5 * len(panels), 4)
        for index, (ax, metric) in enumerate(zip(fig.subplots(1, len(panels)), panels)):
            for name, members in series.items():
                pts = sorted((r for r in members if r.get(metric) is not None), key=lambda r: r[x_key])
                if not pts:
                    continue
                # Runs at one scale only (e.g. unguided seeds) are points, not a vertical line.
                style = "none" if len({r[x_key] for r in pts}) == 1 else "-"
                ax.errorbar([r[x_key] for r in pts], [r[metric] for r in pts], yerr=_errors(pts, metric),
                            marker="o", linestyle=style, capsize=3, label=name if index == 0 else None)
            for a in anchors:
                if a.get(metric) is None:
                    continue
                if _is_number(a.get(x_key)):
                    ax.plot([a[x_key]], [a[metric]], marker="x", linestyle="none", markersize=9,
                            label=f"{a['run']} (published)" if index == 0 else None)
                else:
                    ax.axhline(a[metric], linestyle="--", linewidth=1, color="gray")
                    ax.annotate(f"{a['run']} (published)", (0.01, a[metric]), xycoords=("axes fraction", "data"),
                                fontsize=7, color="gray", va="bottom")
            ax.set(xlabel=x_key, ylabel=METRICS_BY_KEY[metric].header)
            ax.grid(alpha=0.3)
        fig.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0))
        fig.suptitle(heading, fontsize=9)
        figures["_fid_is.png"] = fig

    fig = new_figure(5, 5)
    ax = fig.subplots()
    for name, members in series.items():
        members = [r for r in members if r.get("precision") is not None and r.get("recall") is not None]
        if not members:
            continue
        ax.errorbar([r["recall"] for r in members], [r["precision"] for r in members],
                    xerr=_errors(members, "recall"), yerr=_errors(members, "precision"), marker="o",
                    linestyle="none", capsize=3, label=name)
        if x_key is not None:
            for r in members:
                ax.annotate(_fmt_value(r[x_key]), (r["recall"], r["precision"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    for a in anchors:
        if a.get("precision") is not None and a.get("recall") is not None:
            ax.plot([a["recall"]], [a["precision"]], marker="x", linestyle="none", markersize=9,
                    label=f"{a['run']} (published)")
    ax.set(xlabel="Recall", ylabel="Precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_title(heading, fontsize=8)
    figures["_pr.png"] = fig
    return figures


def new_figure(width, height):
    """A matplotlib figure on the Agg canvas (files only, no display), ``width`` x ``height`` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path, dpi=120):
    """PNG written atomically (a symbolic link at ``path`` is replaced, not followed); returns ``path``."""
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------------------------------------------
# entry point


def make_table(runs, out_dir, group_by=DEFAULT_GROUP_BY, anchors=None, experiment=None, plots=True,
               minimum=False):
    """Gather runs on disk (run directories, result JSON files, or directories of run directories) into one table
    per experiment in ``out_dir`` (``<experiment>.md``, ``.csv``, ``.tex``, ``.png`` plots): ``{experiment: {"rows":
    [...], "files": [...]}}``. Rows are identified and sorted by the ``group_by`` config keys, published ``anchors``
    (:func:`load_anchors`) printed below ours. ``experiment``: one table of this name for every run (default: each
    run's ``experiment`` config key, else the name of the directory above the run directory). Runs of a cell over
    seeds (``<cell>__seed-<s>``) become one row of mean ± std; ``minimum`` adds the minimum over the seeds of FID
    (sFID, FD_DINOv2), as EDM2 reports it."""
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    json_paths = [path for run in runs for path in find_result_files(run)]
    if not json_paths:
        raise ValueError("make_table: no runs given")
    rows = [load_run(p, tuple(group_by)) for p in json_paths]
    if experiment is not None:
        for row in rows:
            row["experiment"] = str(experiment)
    return make_table_from_rows(rows, out_dir, group_by, anchors, plots, minimum)


def make_table_from_results(runs, out_dir, group_by=DEFAULT_GROUP_BY, anchors=None, experiment="experiment",
                            plots=True, minimum=False):
    """:func:`make_table` of runs whose settings the caller knows (the sweep's cells): ``runs`` is
    ``[{"run": name, "values": {group key: value}, "result": evaluator result, "json": path}]``."""
    rows = [row_from_result(r["result"], r["run"], experiment, r["values"], tuple(group_by), r.get("json"))
            for r in runs]
    return make_table_from_rows(rows, out_dir, group_by, anchors, plots, minimum)


def make_table_from_rows(rows, out_dir, group_by=DEFAULT_GROUP_BY, anchors=None, plots=True, minimum=False):
    """Write the tables (and plots) of ``rows`` (from :func:`row_from_result`), one per experiment."""
    group_by = tuple(group_by)
    rows = aggregate_seeds(rows, minimum)
    anchor_rows = [normalise_anchor(a, group_by) for a in (anchors or [])]
    os.makedirs(out_dir, exist_ok=True)
    tables = {}
    for name in sorted({r["experiment"] for r in rows}):
        ours = [r for r in rows if r["experiment"] == name]
        scale_key = _scale_key(ours, group_by)
        ours.sort(key=lambda r: _sort_key(r, group_by, scale_key))
        mark_best_fid(ours)
        table_rows = ours + anchor_rows
        prefix = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment")
        files = []
        for ext, text in (("md", render_markdown(table_rows, group_by, title=name)),
                          ("csv", render_csv(table_rows, group_by)),
                          ("tex", render_latex(table_rows, group_by, title=name))):
            atomic_write_text(f"{prefix}.{ext}", text)
            files.append(f"{prefix}.{ext}")
        if plots:
            files += [save_png(fig, prefix + suffix) for suffix, fig in draw_plots(table_rows, group_by, name).items()]
        tables[name] = {"rows": table_rows, "files": files}
    return tables


def load_anchors(path):
    """The ``anchors:`` list of an experiment YAML (or a YAML file that is itself the list)."""
    with open(path) as f:
        data = parse_yaml(f, f"anchors file {path}")
    if isinstance(data, dict):
        data = data.get("anchors")
        if data is None:
            raise ValueError(f"{path} has no 'anchors:' key")
    if not isinstance(data, list):
        raise ValueError(f"{path}: anchors must be a list of mappings")
    return data


def main(argv=None):
    """``scripts/make_table.py``: each experiment's table printed, its files named on stderr; 2 on bad input."""
    p = FlagParser(separator="-", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (the evaluator's JSON plus config.yaml), result JSON "
                   "files, or directories of runs; runs named <cell>__seed-<s> are one row, mean ± std over the seeds")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY),
                   help="comma-separated config keys identifying a row (default: %(default)s)")
    p.add_argument("--anchors", metavar="YAML", help="experiment YAML whose 'anchors:' list is printed beside ours")
    p.add_argument("--experiment", help="one table of this name for all runs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--minimum", action="store_true",
                   help="for runs over seeds, also a column of the minimum FID over the seeds (EDM2's convention)")
    args = p.parse_args(argv)
    try:
        anchors = load_anchors(args.anchors) if args.anchors else None
        group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
        tables = make_table(args.runs, args.out, group_by=group_by, anchors=anchors, experiment=args.experiment,
                            plots=not args.no_plots, minimum=args.minimum)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for table in tables.values():
        with open(table["files"][0]) as f:
            print(f.read())
        print("wrote: " + ", ".join(table["files"]), file=sys.stderr)
    return 0
