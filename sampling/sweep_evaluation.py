"""A sweep's evaluation: each finished cell against the reference batch (``eval.json`` in its directory), then
the table, made from the cells' settings and results as the sweep hands them over (nothing is re-read from
disk). A cell is evaluated again when its ``eval.json`` was computed from another reference batch, other samples
or other evaluation settings (compared by content hash, not by time). Rank 0 evaluates; the other ranks poll for
its done or failed marker instead of waiting in a collective."""

import inspect
import os
import time
from types import SimpleNamespace

from adm_common.files import HashMemo, atomic_write_text, link_text, read_json_mapping, real_directory
from adm_common.npz import samples_filename
from guided_diffusion import dist_util, logger

from .progress import POLL_SECONDS, PeerFailedError, Rank0Watch
from .settings import SampleConfigError, plain, sampler_label


def check_evaluation(sweep, evaluate_fn=None):
    """Before sampling: the reference batch exists, ``evaluation:`` holds valid options of evaluate() (or of
    ``evaluate_fn``) and ``out_dir/table`` is not a symbolic link."""
    if not sweep.ref_batch:
        return
    table = table_dir(sweep)
    if os.path.islink(table):
        raise SampleConfigError(f"{link_text(table)}: the sweep writes its table only into a real directory, never "
                                "through a link; remove the link and rerun")
    if not os.path.exists(sweep.ref_batch):
        raise SampleConfigError(f"ref_batch {sweep.ref_batch} not found (download the reference batches with "
                                "`make download-refs`)")
    if evaluate_fn is None:
        from evaluations.evaluator import EVALUATION_OPTIONS as known, EvaluationSettings
    else:  # a stand-in (tests): its keyword arguments
        known = [k for k in inspect.signature(evaluate_fn).parameters if k not in ("ref_path", "sample_path",
                                                                                  "json_path")]
    bad = [k for k in sweep.evaluation if k not in known]
    if bad:
        raise SampleConfigError(f"sweep config {sweep.path}: evaluation: unknown argument(s) {', '.join(bad)}")
    if evaluate_fn is None:  # values too: metrics, pr_precision, batch_size
        try:
            EvaluationSettings(**sweep.evaluation)
        except ValueError as e:
            raise SampleConfigError(f"sweep config {sweep.path}: evaluation: {e}") from None


def table_dir(sweep):
    return os.path.join(sweep.out_dir, "table")


EVALUATION_FILES = ("feature_net", "inception_weights", "dinov2_weights")  # evaluate() arguments naming files
INPUTS_KEY = "sweep_inputs"


def _stale_reason(recorded, inputs):
    if not isinstance(recorded, dict):
        return "it does not record its inputs"
    for key, what in (("ref_sha256", "the reference batch"), ("sample_sha256", "the samples"),
                      ("evaluation", "the evaluation settings"), ("evaluation_files", "the feature network"),
                      ("numerics", "the evaluator's numerics (device type, precision, result and cache format)")):
        if recorded.get(key) != inputs[key]:
            return f"{what} changed"
    return None


def _evaluate_cells(cells, sweep, evaluate_fn):
    """Evaluate each cell whose eval.json does not record its current inputs (on this process alone; the inputs go
    into eval.json under ``sweep_inputs``, written once, by the evaluator's one writer); returns the results."""
    from evaluations.evaluator import RESULT_FORMAT, write_result
    from evaluations.features import default_device, feature_numerics
    from evaluations.reference import CACHE_FORMAT, SingleProcess, default_cache_dir

    extractor = SimpleNamespace(device=sweep.evaluation.get("device") or default_device())  # as the evaluator's
    memo = HashMemo(sweep.evaluation.get("cache_dir", default_cache_dir()))
    common = {"ref_sha256": memo.sha256(sweep.ref_batch), "evaluation": plain(dict(sweep.evaluation)),
              "evaluation_files": {k: memo.sha256(v) for k, v in sorted(sweep.evaluation.items())
                                   if k in EVALUATION_FILES and isinstance(v, str) and os.path.isfile(v)},
              # Results of another device type, precision or evaluator format are not reused (features on a GPU
              # and on the CPU differ by rounding; TF32 features before cache format 2 are wrong at 1e-3).
              "numerics": f"{feature_numerics(extractor)} {RESULT_FORMAT} cache{CACHE_FORMAT}"}
    results = []
    for cell in cells:
        s = cell.settings
        npz = os.path.join(cell.out_dir, samples_filename(s.sampling.num_samples, s.model.image_size,
                                                          s.model.image_size))
        if not os.path.exists(npz):
            raise RuntimeError(f"{cell.out_dir}: {os.path.basename(npz)} is missing")
        json_path = os.path.join(cell.out_dir, "eval.json")
        inputs = dict(common, ref_batch=os.path.abspath(sweep.ref_batch), sample_sha256=memo.sha256(npz))
        if os.path.exists(json_path):
            recorded = read_json_mapping(json_path)  # {} when unreadable: evaluated again
            reason = _stale_reason(recorded.get(INPUTS_KEY), inputs)
            if reason is None:
                recorded.pop(INPUTS_KEY, None)
                results.append(recorded)
                continue
            logger.log(f"evaluating {cell.name} again: {reason} since its eval.json")
        logger.log(f"evaluating {npz} against {sweep.ref_batch}")
        result = evaluate_fn(sweep.ref_batch, npz, dist=SingleProcess(), **sweep.evaluation)
        write_result(json_path, dict(result, **{INPUTS_KEY: inputs}))
        results.append(result)
    return results


def _evaluate_and_tabulate(cells, sweep, evaluate_fn, table_fn):
    """Each cell's name, settings (with the sampler label) and result handed to the table code (none re-read)."""
    results = _evaluate_cells(cells, sweep, evaluate_fn)
    runs = [{"run": cell.name, "values": dict(cell.settings.flat(), sampler=sampler_label(cell.settings)),
             "result": result, "json": os.path.join(cell.out_dir, "eval.json")} for cell, result in zip(cells, results)]
    experiment = sweep.name or os.path.basename(os.path.normpath(sweep.out_dir))
    table = real_directory(sweep.out_dir, os.path.basename(table_dir(sweep)), error=SampleConfigError)  # no link
    if table_fn is None:
        from evaluations.table import make_table_from_results as table_fn
    # Runs of a cell over seeds (<cell>__seed-<s>) become one row there; sweep.table: e.g. {minimum: true}.
    out = table_fn(runs, table, anchors=sweep.anchors, experiment=experiment, **sweep.table)
    logger.log(f"table written to {table}")
    return out


_DONE, _FAILED = ".evaluation-done", ".evaluation-failed"


class EvaluationFailedError(RuntimeError):
    """Evaluating a sweep's cells failed (raised on every rank)."""


def evaluation_markers(sweep):
    return os.path.join(sweep.out_dir, _DONE), os.path.join(sweep.out_dir, _FAILED)


def remove_evaluation_markers(sweep):
    """Rank 0, holding every cell's lock: the markers go (a link there: the link itself)."""
    for path in evaluation_markers(sweep):
        if os.path.lexists(path):
            os.remove(path)


def after_runs(cells, sweep, evaluate_fn=None, table_fn=None):
    """The evaluation seam (see the module's docstring); nothing without ``ref_batch``. Ranks other than 0 poll
    for rank 0's marker, not wait in a collective, so a long evaluation cannot time them out; an evaluation error
    is raised on every rank. Returns the table's result on rank 0, else None."""
    if not sweep.ref_batch:
        if dist_util.get_rank() == 0:
            logger.log("no ref_batch in the sweep config: skipping evaluation")
        return None
    if evaluate_fn is None:
        from evaluations.evaluator import evaluate as evaluate_fn
    done, failed = evaluation_markers(sweep)
    result = None
    if dist_util.get_rank() == 0:
        try:
            result = _evaluate_and_tabulate(cells, sweep, evaluate_fn, table_fn)
        except Exception as exc:
            if dist_util.get_world_size() > 1:
                atomic_write_text(failed, f"{type(exc).__name__}: {exc}")
            raise EvaluationFailedError(f"evaluation failed: {type(exc).__name__}: {exc}") from exc
        if dist_util.get_world_size() > 1:
            atomic_write_text(done, "")
    else:
        watch = Rank0Watch(cells[0].out_dir) if cells else None  # rank 0 holds every cell's run lock
        while not (os.path.exists(done) or os.path.exists(failed)):
            if watch is not None:
                try:
                    watch.check()
                except PeerFailedError:  # rank 0 died: no marker comes
                    if os.path.exists(done) or os.path.exists(failed):
                        break
                    raise
            time.sleep(POLL_SECONDS)
        if os.path.exists(failed):
            with open(failed) as f:
                raise EvaluationFailedError(f"evaluation failed: {f.read()}")
    dist_util.barrier()
    if dist_util.get_rank() == 0:
        remove_evaluation_markers(sweep)
    return result
