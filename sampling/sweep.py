"""Sweeps: a base configuration and a grid of values, one resumable run per grid cell (docs/sampling.md#sweeps).
Every cell is checked and locked before the first sample (the plan with ``check_only``), then the cells run one after
the other in the same process world and :func:`after_runs` evaluates them and makes the table."""

import dataclasses
import hashlib
import itertools
import os
import re
from typing import Any, Dict, List, Optional

from adm_common.files import link_text
from evaluations.uncertainty import TABLE_OPTIONS, seed_run_name
from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import CheckpointError

from . import lock as run_lock
from .layout import RunLayout, shard_index
from .models import build_networks
from .plan import out_dir_state, prepare
from .process import resolve_device
from .execute import execute
from .run import configure_logging, make_sampler
from .settings import (SampleConfigError, check_keys, read_yaml_mapping, resolve_settings, sample_defaults,
                       settings_warnings, suggest, to_command)
from .sweep_evaluation import after_runs, check_evaluation, remove_evaluation_markers

SWEEP_KEYS = ("out_dir", "base", "grid", "ref_batch", "evaluation", "name", "anchors", "seeds", "table")
MAX_NAME = 120


@dataclasses.dataclass
class Cell:
    name: str
    assignments: Dict[str, Any]  # grid axis -> the value (or bundle) of this cell, as written
    overrides: Dict[str, Any]  # flag -> value set by the grid
    settings: Any  # RunSettings

    @property
    def out_dir(self):
        return self.settings.out_dir


@dataclasses.dataclass
class Sweep:
    path: str
    out_dir: str
    base: Dict[str, Any]
    axes: List[tuple]  # [(axis name, [values])]
    ref_batch: Optional[str] = None
    evaluation: Dict[str, Any] = dataclasses.field(default_factory=dict)
    name: Optional[str] = None
    anchors: Optional[list] = None
    seeds: Optional[List[int]] = None  # each cell once per seed; None: once, with base's seed
    table: Dict[str, Any] = dataclasses.field(default_factory=dict)  # make_table_from_results options


def load_sweep(path, out_dir=None, overrides=None):
    """Read and check a sweep YAML (``out_dir`` overrides its ``out_dir:``; ``overrides`` its ``base:``
    settings, e.g. ``{"num_samples": 1000}`` from ``--set num_samples=1000``)."""
    data = read_yaml_mapping(path, what="sweep config")
    unknown = [k for k in data if k not in SWEEP_KEYS]
    if unknown:
        raise SampleConfigError(
            f"unknown key(s) in sweep config {path}: "
            + ", ".join(f"{k}{suggest(k, SWEEP_KEYS)}" for k in unknown)
            + f"; a sweep config has {', '.join(SWEEP_KEYS)} (settings go under base:)")
    out_dir = out_dir or data.get("out_dir")
    if not out_dir:
        raise SampleConfigError(f"sweep config {path}: out_dir is required (out_dir: DIR, or --out_dir)")
    base = data.get("base") or {}
    grid = data.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise SampleConfigError(f"sweep config {path}: base and grid must be mappings")
    base = {**base, **(overrides or {})}
    seeds, base, grid = _seeds(path, data, base, grid)
    for key in ("out_dir", "overwrite"):
        if key in base or key in grid:
            raise SampleConfigError(f"sweep config {path}: {key} cannot be set in base or grid (cells get "
                                    "out_dir/<cell name>; pass --overwrite to scripts/sweep.py)")
    check_keys(base, f"base of {path}")
    flags = sample_defaults()
    axes, owner = [], {}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SampleConfigError(f"sweep config {path}: grid.{axis} must be a non-empty list of values "
                                    "(a single value belongs in base)")
        if axis in flags:
            keys = [axis]
        else:
            if not all(isinstance(v, dict) for v in values):
                raise SampleConfigError(
                    f"sweep config {path}: grid.{axis} is not a setting{suggest(axis, list(flags))}; "
                    "an axis that is not a setting must list mappings of settings (with an optional name)")
            keys = sorted({k for v in values for k in v if k != "name"})
            for value in values:
                check_keys({k: v for k, v in value.items() if k != "name"}, f"grid.{axis} of {path}")
        for key in keys:
            if key in owner:
                raise SampleConfigError(f"sweep config {path}: {key} is set by both grid.{owner[key]} and "
                                        f"grid.{axis}")
            owner[key] = axis
        axes.append((axis, values))
    evaluation = data.get("evaluation") or {}
    if not isinstance(evaluation, dict):
        raise SampleConfigError(f"sweep config {path}: evaluation must be a mapping of evaluate() arguments")
    anchors = data.get("anchors")
    if anchors is not None and not isinstance(anchors, list):
        raise SampleConfigError(f"sweep config {path}: anchors must be a list")
    table = data.get("table") or {}
    if not isinstance(table, dict) or any(k not in TABLE_OPTIONS for k in table) or \
            not all(isinstance(v, bool) for v in table.values()):
        raise SampleConfigError(f"sweep config {path}: table must be a mapping of {', '.join(TABLE_OPTIONS)} to "
                                f"true or false, got {table!r}")
    return Sweep(path=str(path), out_dir=str(out_dir), base=base, axes=axes, ref_batch=data.get("ref_batch"),
                 evaluation=evaluation, name=data.get("name"), anchors=anchors, seeds=seeds, table=table)


def _seeds(path, data, base, grid):
    """``(seeds, base, grid)``: the seeds every cell runs with (None: one run per cell), from ``seeds: N`` (N
    consecutive seeds from base's seed, default 0), ``seeds: [...]``, a list as base's ``seed:`` or the grid's
    ``seed`` axis, which are taken out of base and grid."""
    given = [(where, value) for where, value in (
        ("seeds", data.get("seeds")), ("base.seed", base.get("seed") if isinstance(base.get("seed"), list) else None),
        ("grid.seed", grid.get("seed"))) if value is not None]
    if not given:
        return None, base, grid
    if len(given) > 1:
        raise SampleConfigError(f"sweep config {path}: the seeds are given by both {given[0][0]} and "
                                f"{given[1][0]}; give them once")
    where, value = given[0]

    def seed(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if where == "seeds" and seed(value) and value > 0:
        start = base.get("seed", 0)
        if not seed(start):
            raise SampleConfigError(f"sweep config {path}: base seed must be an integer >= 0, got {start!r}")
        value = list(range(start, start + value))
    if not isinstance(value, list) or not value or not all(seed(v) for v in value) or len(set(value)) < len(value):
        count = "a number of seeds >= 1 or " if where == "seeds" else ""
        raise SampleConfigError(f"sweep config {path}: {where} must be {count}a list of distinct seeds >= 0, got "
                                f"{value!r}")
    return (value, {k: v for k, v in base.items() if not (k == "seed" and where == "base.seed")},
            {k: v for k, v in grid.items() if k != "seed"})


def cell_name(assignments):
    """A cell's directory name: ``axis-value`` parts joined by ``__`` (a bundle's name, a list's values by ``+``)."""
    if not assignments:
        return "base"
    parts = []
    for axis, value in assignments.items():
        text = str(value.get("name", "")) if isinstance(value, dict) else \
            "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(f"{axis}-{text}" if text else axis)
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", "__".join(parts)).strip("._") or "cell"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 11]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def expand(sweep, overwrite=False):
    """The sweep's cells, each with resolved settings (errors name the cell)."""
    cells, seen = [], {}
    names = [axis for axis, _ in sweep.axes]
    for combo in itertools.product(*[values for _, values in sweep.axes]):
        assignments = dict(zip(names, combo))
        overrides = {}
        for axis, value in assignments.items():
            if not isinstance(value, dict):
                overrides[axis] = value
                continue
            if not value.get("name"):  # bundles without a name are numbered by position
                assignments[axis] = dict(value, name=str(dict(sweep.axes)[axis].index(value)))
            overrides.update({k: v for k, v in value.items() if k != "name"})
        name = cell_name(assignments)
        if name in seen:
            raise SampleConfigError(f"sweep config {sweep.path}: cells {seen[name]} and {assignments} get the "
                                    f"same directory name {name!r}; give the bundles distinct names")
        seen[name] = assignments
        if sweep.seeds is not None and "seed" in overrides:
            raise SampleConfigError(f"sweep config {sweep.path}: cell {name} sets seed, and the sweep gives the "
                                    "seeds of every cell (seeds:); set it in one place")
        runs = [(name, overrides)] if sweep.seeds is None else \
            [(seed_run_name(name, seed), dict(overrides, seed=seed)) for seed in sweep.seeds]
        for run_name, run_overrides in runs:
            try:
                settings = resolve_settings([
                    (f"base of {sweep.path}", sweep.base),
                    (f"grid cell {run_name}", run_overrides),
                    ("the sweep", {"out_dir": os.path.join(sweep.out_dir, run_name), "overwrite": overwrite}),
                ])
            except SampleConfigError as e:
                raise SampleConfigError(f"cell {run_name}: {e}") from None
            cells.append(Cell(run_name, assignments, run_overrides, settings))
    return cells


def cell_status(cell):
    """'complete', 'k/n shards', or 'new' (read from the file system only)."""
    layout = RunLayout.of(cell.settings)
    if os.path.exists(layout.final_path):
        return "complete"
    done = sum(1 for name in layout.shard_files() if shard_index(name) < layout.num_shards)
    return f"{done}/{layout.num_shards} shards" if done else "new"


def refuse_linked_cell(cell):
    """A cell's directory is the sweep's to make: a symbolic link there would take the cell's lock, record and
    shards elsewhere, and --overwrite would delete what it points to. (A run's own --out_dir, or the sweep's
    out_dir, may be a link: the user's choice.)"""
    if os.path.islink(cell.out_dir):
        raise SampleConfigError(f"{link_text(cell.out_dir)}; a sweep makes its cells' directories itself: remove the "
                                "link (or give the sweep another out_dir)")


def check_cell(cell):
    """What a real run would refuse in this cell, by a run's own checks without its lock: (problems, notes)."""
    s = cell.settings
    notes = [f"warning: {w}" for w in settings_warnings(s)]
    try:
        refuse_linked_cell(cell)
        build_networks(s)
        state = out_dir_state(s, resolve_device(s).type, lock_held=False)
    except (SampleConfigError, CheckpointError) as e:
        return [str(e)], notes
    return [], notes + state.overwrite_notes()


def check_cells(sweep, cells, evaluate_fn=None):
    """For ``--dry_run``: {cell name: (problems, notes)}, the sweep's own problems under the key None."""
    found = {cell.name: check_cell(cell) for cell in cells}
    try:
        check_evaluation(sweep, evaluate_fn)
        found[None] = ([], [])
    except SampleConfigError as e:
        found[None] = ([str(e)], [])
    return found


def describe(sweep, cells, checks):
    """The dry-run listing (each cell, its grid settings, status and command), and what would fail: (text, problems)."""
    lines = [f"{len(cells)} cell(s) in {sweep.out_dir}:"]
    problems = []
    for cell in cells:
        settings = ", ".join(f"{k}={v}" for k, v in cell.overrides.items()) or "(base only)"
        cell_problems, notes = checks[cell.name]
        status = f"invalid: {cell_problems[0].splitlines()[0]}" if cell_problems else cell_status(cell)
        if any(note.startswith("--overwrite") for note in notes):
            status = "another configuration: --overwrite replaces it"
        lines.append(f"  {cell.name}  [{status}]  {settings}")
        lines.extend(f"    {note}" for note in notes)
        lines.append(f"    {to_command(cell.settings)}")
        problems += [f"cell {cell.name}: {p}" for p in cell_problems]
    problems += checks[None][0]
    if sweep.ref_batch:
        lines.append(f"then: evaluate each cell against {sweep.ref_batch} (eval.json) and write the table to "
                     f"{os.path.join(sweep.out_dir, 'table')}")
    else:
        lines.append("no ref_batch: cells are not evaluated")
    lines += [f"error: {p}" for p in problems]
    return "\n".join(lines), problems


def _for_each_cell(stage, cells, *columns):
    """``stage(cell, *values)`` for every cell and its values in ``columns``, an error naming its cell."""
    results = []
    for cell, *values in zip(cells, *columns):
        try:
            results.append(stage(cell, *values))
        except (SampleConfigError, CheckpointError) as e:
            raise type(e)(f"cell {cell.name}: {e}") from None
    return results


def run_sweep(sweep, cells, evaluate_fn=None, table_fn=None, model_wrapper=None):
    """Every cell through a run's line of stages (collective): every cell checked and locked first (check_only), then
    each planned, sampled and merged, then :func:`after_runs`. Returns the cells' out_dirs."""
    check_evaluation(sweep, evaluate_fn)
    with run_lock.RunLocks() as locks:
        devices = {cell.name: resolve_device(cell.settings) for cell in cells}
        # Every setting of every cell (meta-device networks, layers, checkpoints), every out_dir and run record,
        # and the run locks, before anything of any cell is deleted (--overwrite), loaded or sampled.
        _for_each_cell(refuse_linked_cell, cells)
        networks = _for_each_cell(lambda cell: build_networks(cell.settings), cells)
        _for_each_cell(lambda cell: prepare(cell.settings, devices[cell.name].type, check_only=True, locks=locks),
                       cells)
        # Every cell's lock is ours now, so no other sweep of these cells runs: the evaluation markers of an
        # earlier one go, before the next collective (no rank then sees a stale marker). A sweep refused above
        # leaves them.
        if dist_util.get_rank() == 0:
            remove_evaluation_markers(sweep)
        plans = _for_each_cell(lambda cell: prepare(cell.settings, devices[cell.name].type, locks=locks), cells)
        cache = {}  # cells of the same model flags share the loaded network
        samplers = _for_each_cell(lambda cell, plan, cell_networks: make_sampler(
            plan, cell_networks, devices[cell.name], cache, model_wrapper), cells, plans, networks)
        for i, (cell, plan, sampler) in enumerate(zip(cells, plans, samplers)):
            configure_logging(cell.out_dir)
            if dist_util.get_rank() == 0:
                logger.log(f"sweep cell {i + 1}/{len(cells)}: {cell.name}")
            execute(plan, sampler)
        logger.configure(dir=sweep.out_dir, format_strs=["stdout", "log"])
        after_runs(cells, sweep, evaluate_fn, table_fn)
    return [cell.out_dir for cell in cells]
