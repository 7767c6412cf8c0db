"""Sampling at scale: the run schema, run planning and resume, the sampler, sharded npz output and sweeps (the
official checkpoints' model configs ship in ``sampling/configs/``).

    settings = sampling.resolve_settings([("my settings", {"model": "256x256_diffusion", "out_dir": "out",
                                                           "pag_scale": 3.0, "num_samples": 1000})])
    sampling.run(settings)        # -> out/samples_1000x256x256x3.npz (several processes: start_process first)
"""

from .execute import PeerFailedError, execute
from .layout import RunLayout
from .models import Networks, build_networks, load_models, load_networks
from .plan import RunPlan, prepare
from .process import resolve_device, start_process
from .run import run
from .sampler import NonFiniteError, Sampler, sample_draws, sample_labels, sample_seeds
from .settings import RunSettings, SampleConfigError, build_settings, resolve_settings

__all__ = [
    "Networks", "NonFiniteError", "PeerFailedError", "RunLayout", "RunPlan", "RunSettings", "SampleConfigError",
    "Sampler", "build_networks", "build_settings", "execute", "load_models", "load_networks",
    "prepare", "resolve_device", "resolve_settings", "run", "sample_draws", "sample_labels", "sample_seeds",
    "start_process"
]
