"""One sampling run from settings to npz: plan (under the run lock), load, sample, merge."""

from guided_diffusion import dist_util, logger

from . import lock as run_lock
from .execute import execute
from .models import load_models
from .plan import prepare, resolve_device
from .sampler import Sampler
from .sweep import configure_logging


def run(settings, model_cache=None, model_wrapper=None, on_shard_written=None, on_shard_claimed=None):
    """Sample ``settings`` (a checked ``RunSettings``) to completion; returns the npz path.

    ``model_wrapper``, ``on_shard_written`` and ``on_shard_claimed`` are seams for tests (see ``Sampler`` and
    ``execute``). The run lock of ``out_dir`` (taken by ``prepare`` on rank 0) is released when this returns or
    raises.
    """
    dist_util.setup_dist()
    device = resolve_device(settings)
    with run_lock.RunLocks() as locks:
        plan = prepare(settings, device, locks=locks)
        configure_logging(plan.out_dir)
        sampler = None
        if not plan.complete:
            if dist_util.get_rank() == 0:
                m = settings.model
                logger.log(f"loading {m.model_path}" + (f" and {m.classifier_path}" if m.classifier_path else ""))
            models = load_models(settings, device, model_cache)
            sampler = Sampler(settings, models, device, model_wrapper=model_wrapper)
        return execute(plan, sampler, on_shard_written=on_shard_written, on_shard_claimed=on_shard_claimed)
