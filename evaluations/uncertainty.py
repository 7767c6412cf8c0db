"""How uncertain a table row is: the runs of one cell over several seeds (``<cell>__seed-<seed>``, merged into one
row: each metric's mean, std with ddof=1 and, with ``minimum=True``, the minimum, as EDM2 reports FID), or a single
run's bootstrap std (:func:`bootstrap_stds`). Tables print either as ``mean ± std``; plots draw error bars.
"""
import re
import statistics

from .metrics import METRIC_TABLE

SEED_SUFFIX = "__seed-"
_SEED_RUN = re.compile(r"^(?P<cell>.+)" + re.escape(SEED_SUFFIX) + r"(?P<seed>\d+)$")
ROW_METRICS = tuple(m.key for m in METRIC_TABLE)
# The metrics whose minimum over seeds is a column when asked: lower is better (EDM2 reports min FID of 3 seeds).
MINIMUM_METRICS = ("fid", "sfid", "fd_dinov2")
TABLE_OPTIONS = ("minimum",)  # a sweep's ``table:`` mapping: keyword arguments of make_table_from_results


def seed_run_name(cell, seed):
    """The run (directory) name of ``cell`` sampled with ``seed``."""
    return f"{cell}{SEED_SUFFIX}{seed}"


def split_seed_run(name):
    """``(cell, seed)`` of a name made by :func:`seed_run_name`, else ``(name, None)``."""
    match = _SEED_RUN.match(name or "")
    return (match["cell"], int(match["seed"])) if match else (name, None)


def std_key(metric):
    return f"{metric}_std"


def min_key(metric):
    return f"{metric}_min"


def bootstrap_stds(result):
    """``{"<metric>_std": std}`` and the row's ``uncertainty`` from an evaluator result's ``bootstrap`` interval
    (nothing without one)."""
    intervals = result.get("bootstrap")
    if not isinstance(intervals, dict):
        return {}
    out = {std_key(k): float(intervals[k]["std"]) for k in ROW_METRICS if isinstance(intervals.get(k), dict)}
    return dict(out, uncertainty=f"bootstrap of {intervals.get('k')}") if out else {}


def aggregate_seeds(rows, minimum=False):
    """``rows`` with the runs of each cell over seeds (same experiment, names ``<cell>__seed-<s>``) merged into one
    row named ``<cell>`` (where its first run was): each metric's mean, ``<metric>_std`` (ddof=1; None for one
    seed), with ``minimum`` ``<metric>_min`` (of :data:`MINIMUM_METRICS`), ``seeds`` and ``seed_values``; a metric
    missing from some run is None rather than averaged over the others. Other rows are returned unchanged."""
    groups = {}  # in the order of each group's first row
    for row in rows:
        cell, seed = split_seed_run(row.get("run"))
        key = (row.get("experiment"), cell) if seed is not None else id(row)
        groups.setdefault(key, []).append((seed, row))
    return [members[0][1] if members[0][0] is None else _merge(key[1], sorted(members, key=lambda m: m[0]), minimum)
            for key, members in groups.items()]


# What the runs of one cell over seeds must share to be one row (a table of two sweeps, or of runs cut with other
# settings, could otherwise average unlike things).
SHARED_BY_SEEDS = ("num_samples", "pag_scale", "pag_layers", "perturbation", "sampler", "source", "labels")


def _merge(cell, members, minimum):
    seeds, runs = [m[0] for m in members], [m[1] for m in members]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cell {cell}: seed {next(s for s in seeds if seeds.count(s) > 1)} appears in two runs of "
                         "the table; give each table one run per seed (e.g. tabulate one sweep at a time)")
    for key in SHARED_BY_SEEDS:
        values = {repr(r.get(key)) for r in runs}
        if len(values) > 1:
            raise ValueError(f"cell {cell}: its runs over seeds differ in {key} ({', '.join(sorted(values))}); "
                             "only runs that differ in their seed are averaged")
    row = dict(runs[0], run=cell, seeds=len(runs), seed_values=seeds, uncertainty=f"{len(runs)} seeds",
               random_weights=any(r.get("random_weights") for r in runs),
               json=";".join(str(r.get("json")) for r in runs))
    for metric in ROW_METRICS:
        row.pop(min_key(metric), None)
        values = [r.get(metric) for r in runs]
        if any(v is None for v in values):
            row[metric], row[std_key(metric)] = None, None
            continue
        row[metric] = statistics.fmean(values)
        row[std_key(metric)] = statistics.stdev(values) if len(values) > 1 else None
        if minimum and metric in MINIMUM_METRICS:
            row[min_key(metric)] = min(values)
    return row
