"""One sampling run from settings to npz: plan, load, sample, merge."""

from guided_diffusion import dist_util, logger

from .execute import execute
from .models import load_models
from .plan import prepare, resolve_device
from .sampler import Sampler
from .sweep import configure_logging


def run(settings, model_cache=None, model_wrapper=None, on_shard_written=None):
    """Sample ``settings`` (a checked ``RunSettings``) to completion; returns the npz path.

    ``model_wrapper`` and ``on_shard_written`` are seams for tests (see ``Sampler`` and ``execute``).
    """
    dist_util.setup_dist()
    device = resolve_device(settings)
    plan = prepare(settings, device)
    configure_logging(plan.out_dir)
    sampler = None
    if not plan.complete:
        if dist_util.get_rank() == 0:
            m = settings.model
            logger.log(f"loading {m.model_path}" + (f" and {m.classifier_path}" if m.classifier_path else ""))
        models = load_models(settings, device, model_cache)
        sampler = Sampler(settings, models, device, model_wrapper=model_wrapper)
    return execute(plan, sampler, on_shard_written=on_shard_written)
