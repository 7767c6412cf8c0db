"""One sampling run as one line of stages (docs/layout.md): settings, resolved once (pure) -> the process, started
once by the entry point -> the networks, built once -> the plan, under the run lock (no model code) -> the sampler,
carried out shard by shard and merged. A sweep is the same line in a loop; checking every cell first is the plan
with ``check_only``."""

from guided_diffusion import dist_util, logger

from . import lock as run_lock
from .execute import execute
from . import models
from .plan import prepare
from .process import resolve_device
from .sampler import Sampler


def configure_logging(out_dir):
    logger.configure(dir=out_dir, format_strs=["stdout", "log"], all_ranks=True)


def make_sampler(plan, networks, device, cache=None, model_wrapper=None):
    """The run's log in its out_dir, ``networks`` loaded on ``device`` (``cache``: those of earlier runs) and the
    :class:`Sampler` using them; None for a complete plan."""
    configure_logging(plan.out_dir)
    if plan.complete:
        return None
    settings = plan.settings
    if dist_util.get_rank() == 0:
        m = settings.model
        logger.log(f"loading {m.model_path}" + (f" and {m.classifier_path}" if m.classifier_path else ""))
    return Sampler(settings, models.load_networks(networks, settings, device, cache), device,
                   model_wrapper=model_wrapper)


def run(settings, model_wrapper=None, on_shard_written=None, on_shard_claimed=None):
    """Sample ``settings`` (checked) to completion; returns the npz path. The entry point has started the process
    (``start_process``; one process needs nothing). ``model_wrapper``, ``on_shard_*``: test seams. The run lock is
    released when this returns or raises."""
    device = resolve_device(settings)
    networks = models.build_networks(settings)  # every check that needs no weights, before out_dir is touched
    with run_lock.RunLocks() as locks:
        plan = prepare(settings, device.type, locks=locks)
        sampler = make_sampler(plan, networks, device, model_wrapper=model_wrapper)
        return execute(plan, sampler, on_shard_written=on_shard_written, on_shard_claimed=on_shard_claimed)
