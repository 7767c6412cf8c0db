"""The command lines of ``scripts/image_sample.py`` and ``scripts/sweep.py``: flags, the one exit-code mapping and
the process-wide settings of a sampling process (set here, in the entry point, not on import). Exit status
(docs/what-happens-when.md): 0 done, 2 bad input (before anything is sampled or deleted; also an out_dir in use, or
processes that cannot form their group), 1 a failed run (finished shards are kept), 128 + the signal's number."""

import argparse
import contextlib
import errno
import os
import signal
import sys

import torch as th

from adm_common.files import DiskFullError, disk_full
from adm_common.flags import FlagParser
from adm_common.launch import rank_from_env, world_size_from_env
from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import CheckpointError

from .execute import RunStopped
from .process import start_process
from .progress import PeerFailedError
from .run import run
from .sampler import NonFiniteError
from .settings import SETTINGS, SampleConfigError, parse_overrides, read_yaml_mapping, resolve_settings
from .sweep import check_cells, describe, expand, load_sweep, run_sweep
from .sweep_evaluation import EvaluationFailedError

SAMPLE_DESCRIPTION = "Sample N images with PAG / SAG / classifier guidance into an upstream-format npz, resumably."
SWEEP_DESCRIPTION = "Sweeps: a base configuration and a grid of values, one resumable sampling run per grid cell."


def build_sample_parser():
    parser = FlagParser(description=SAMPLE_DESCRIPTION, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="settings file (keys are flag names); command-line flags win")
    for key, setting in SETTINGS.items():
        text = setting.help
        if "(default:" not in text:  # a help text that explains its default says it once
            text = f"{text} (default: {setting.default!r})".strip()
        bool_flag = dict(nargs="?", const=True, metavar="BOOL") if isinstance(setting.default, bool) else {}
        parser.add_argument(f"--{key}", help=text, **bool_flag)  # strings, read as YAML values are (coerce)
    return parser


def resolve_cli(argv=None):
    """The checked ``RunSettings`` of a command line (and its ``--config`` file)."""
    given = vars(build_sample_parser().parse_args(argv))
    config = given.pop("config", None)
    layers = [(f"--config {config}", read_yaml_mapping(config))] if config else []
    return resolve_settings(layers + [("the command line", given)])


def build_sweep_parser():
    p = FlagParser(description=SWEEP_DESCRIPTION,
                   epilog="Run under mpiexec/torchrun/srun to sample every cell on many GPUs.")
    p.add_argument("config", help="sweep YAML (base:, grid:, out_dir:, optional ref_batch:)")
    p.add_argument("--out_dir", help="overrides the config's out_dir")
    p.add_argument("--dry_run", action="store_true",
                   help="list the cells, their state and equivalent commands; sample nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of cells whose directory holds another configuration")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base setting of every cell, e.g. --set num_samples=1000 (repeatable)")
    return p


def report_error(error, everywhere):
    """Print ``error`` once (rank 0) for errors every rank raised alike, else on this rank. Before the process group
    exists (settings are resolved first) the launcher's rank and size say so, so that it is printed once per job."""
    if th.distributed.is_available() and th.distributed.is_initialized():
        rank, size = dist_util.get_rank(), dist_util.get_world_size()
    else:
        rank, size = rank_from_env(), world_size_from_env()
    if everywhere and rank != 0:
        return
    prefix = f"[rank {rank}] " if size > 1 and not everywhere else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _stop_on_signal():
    """While active, SIGTERM (SLURM preemption, scancel, mpiexec forwarding it) and SIGINT raise
    :class:`RunStopped` in the main thread: the batch being sampled is dropped with the shard being written,
    finished shards stay. A second signal during the clean-up is ignored."""
    previous, fired = {}, []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise RunStopped(signum)

    with contextlib.suppress(ValueError):  # ValueError: not the main thread, the signals are left alone
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def exit_code(body):
    """Run ``body()`` and map its outcome to the exit status (the one mapping of both commands)."""
    try:
        with _stop_on_signal():
            body()
    except (SampleConfigError, CheckpointError) as e:
        report_error(e, everywhere=True)
        return 2
    except dist_util.DistSetupError as e:
        report_error(e, everywhere=e.everywhere)
        return 2
    except (NonFiniteError, PeerFailedError, DiskFullError) as e:
        report_error(e, everywhere=False)
        return 1
    except EvaluationFailedError as e:
        report_error(e, everywhere=True)
        return 1
    except RunStopped as e:
        message = f"{e}; rerun the same command to resume"
        with contextlib.suppress(OSError):
            logger.log(message)  # into the run's log.txt
        report_error(message, everywhere=False)
        return 128 + e.signum
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        path = e.filename or "an output file"
        report_error(disk_full(os.path.dirname(path) or path, path), everywhere=False)
        return 1
    logger.reset()
    dist_util.cleanup_dist()
    return 0


def main(argv=None, on_shard_written=None, on_shard_claimed=None):
    """``scripts/image_sample.py``. ``on_shard_written`` / ``on_shard_claimed``: test seams (see ``execute``)."""

    def body():
        settings = resolve_cli(argv)
        start_process([settings])
        run(settings, on_shard_written=on_shard_written, on_shard_claimed=on_shard_claimed)

    return exit_code(body)


def sweep_main(argv=None):
    """``scripts/sweep.py``."""
    args = build_sweep_parser().parse_args(argv)

    def body():
        sweep = load_sweep(args.config, args.out_dir, parse_overrides(args.overrides))
        cells = expand(sweep, overwrite=args.overwrite)
        if args.dry_run:
            text, problems = describe(sweep, cells, check_cells(sweep, cells))
            print(text)
            if problems:
                raise SampleConfigError(f"the sweep would fail: {len(problems)} problem(s):\n  "
                                        + "\n  ".join(problems))
            return
        start_process([cell.settings for cell in cells])
        run_sweep(sweep, cells)

    return exit_code(body)
