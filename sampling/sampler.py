"""Drawing samples by index. Sample i's label, x_T and every step's noise come from generators seeded with
``(seed, i)`` only (on the sampling device, so CPU and GPU runs differ), random perturbations get per-sample
``row_seeds`` from the same pair: a sample depends on neither the batch size nor which process drew it. Nothing is
read back from the device during the loop (the non-finite check once per batch)."""

import collections

import numpy as np
import torch as th

import pag
from guided_diffusion import logger
from guided_diffusion.script_util import NUM_CLASSES

from .images import to_uint8_nhwc
from .models import guide


class NonFiniteError(RuntimeError):
    """A sample became NaN or infinite."""


def sample_seeds(seed, index):
    """(noise seed, label seed, row seed) of sample ``index``: functions of (seed, index) only."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(3, dtype=np.uint64)
    return int(state[0]), int(state[1]), int(state[2]) & (2**63 - 1)


BALANCED_LABELS_KEY = 0xBA1  # keys the permutation of balanced labels apart from the per-sample seeds


def sample_labels(seed, indices, num_classes=NUM_CLASSES, balanced_over=None):
    """Class labels of samples ``indices``, uniform over ``num_classes`` from (seed, i) only; ``balanced_over=N``:
    sample i gets ``order[i] % num_classes``, ``order`` a permutation of 0..N-1 seeded by (seed, N), so each class
    occurs N / num_classes times (the first N % num_classes once more) and label i depends on (seed, i, N) only."""
    if balanced_over is None:
        return np.array([np.random.default_rng(sample_seeds(seed, i)[1]).integers(num_classes) for i in indices],
                        dtype=np.int64)
    indices = np.asarray(list(indices), dtype=np.int64)
    if indices.size and not 0 <= indices.min() <= indices.max() < balanced_over:
        raise ValueError(f"balanced labels exist for samples 0..{balanced_over - 1}, asked for "
                         f"{indices.min()}..{indices.max()}")
    order = np.random.default_rng([int(seed), BALANCED_LABELS_KEY, int(balanced_over)]).permutation(balanced_over)
    return (order[indices] % num_classes).astype(np.int64)


def noise_fn(seed, indices, device):
    """``randn_like(x)`` of the batch ``indices``: row j's noise comes from sample indices[j]'s generator on
    ``device``, seeded with (seed, indices[j]), in draw order (x_T first, then each step's)."""
    generators = [th.Generator(device=device).manual_seed(sample_seeds(seed, i)[0]) for i in indices]

    def randn_like(x):
        if x.shape[0] != len(generators):
            raise RuntimeError(f"noise requested for {x.shape[0]} rows, the batch has {len(generators)}")
        noise = th.empty(tuple(x.shape), device=device)  # float32, as th.randn draws
        for row, g in zip(noise, generators):  # the same numbers as separate draws stacked
            th.randn(tuple(x.shape[1:]), generator=g, device=device, out=row)
        return noise.to(x.dtype)

    return randn_like


# Everything random about some samples of a run: their noise stream, their labels (None without) and what the
# guided model gets (``row_seeds``, and ``y`` with labels), all on the sampling device.
SampleDraws = collections.namedtuple("SampleDraws", "randn_like labels model_kwargs")


def sample_draws(settings, indices, device, with_labels):
    """The :class:`SampleDraws` of ``indices``: functions of (seed, index) only, so a sample does not depend on the
    batch size, the number of processes or which process drew it. The one place a sample's randomness is made
    (the sampler and ``analysis.trace`` both draw here)."""
    seed = settings.sampling.seed
    # On the device once per batch: random perturbations hash the row seeds there (and a tensor, unlike host ints,
    # does not make torch.compile specialise on each batch's values).
    model_kwargs = {"row_seeds": th.tensor([sample_seeds(seed, i)[2] for i in indices], dtype=th.long,
                                           device=device)}
    labels = None
    if with_labels:
        balanced_over = settings.sampling.num_samples if settings.sampling.labels == "balanced" else None
        labels = sample_labels(seed, indices, settings.sampling.num_classes, balanced_over)
        model_kwargs["y"] = th.from_numpy(labels).to(device)
    return SampleDraws(noise_fn(seed, indices, device), labels, model_kwargs)


class Sampler:
    """``sample([i, j, ...]) -> (uint8 NHWC images, int64 labels or None)`` with the networks it is given (it builds
    none; networks loaded for other guidance settings are guided by this run's). ``model_wrapper(fn) -> fn`` wraps the
    guided model function (tests inject faults with it)."""

    def __init__(self, settings, networks, device, model_wrapper=None):
        self.settings = settings
        self.device = device
        self.diffusion = networks.diffusion
        guided = networks.guided
        if guided is None or guided.config != settings.guidance:
            guided = guide(networks.model, settings, self.diffusion)
        self.guided = guided
        class_cond = settings.model.class_cond

        def model_fn(x, t, y=None, **kwargs):
            # An unconditional network gets no labels (they are there for the classifier).
            return guided(x, t, y=y, **kwargs) if class_cond else guided(x, t, **kwargs)

        self.model_fn = model_wrapper(model_fn) if model_wrapper else model_fn
        self.cond_fn = None
        if networks.classifier is not None:
            self.cond_fn = pag.classifier_cond_fn(networks.classifier, settings.guidance.classifier_scale)
        self.with_labels = bool(class_cond or networks.classifier is not None)
        if th.device(device).type == "cpu" and settings.compute_dtype == "float16":
            logger.log("note: the U-Net computes in float16 (use_fp16), which has no fast CPU kernels: about 70 "
                       "times slower than --dtype float32 or bfloat16 on the CPU (those change the samples)")

    def draws(self, indices):
        return sample_draws(self.settings, indices, self.device, self.with_labels)

    def steps(self, indices, draws):
        """The diffusion loop over ``indices`` with their :meth:`draws`, yielding each step's output."""
        s = self.settings
        self.guided.start_batch()  # APG's momentum is per batch
        loop = self.diffusion.ddim_sample_loop_progressive if s.sampling.use_ddim else \
            self.diffusion.p_sample_loop_progressive
        shape = (len(indices), 3, s.model.image_size, s.model.image_size)
        yield from loop(self.model_fn, shape, clip_denoised=s.sampling.clip_denoised, cond_fn=self.cond_fn,
                        model_kwargs=draws.model_kwargs, device=self.device, randn_like=draws.randn_like)

    def sample(self, indices):
        s = self.settings
        draws = self.draws(indices)
        steps = self.diffusion.num_timesteps
        timestep_map = getattr(self.diffusion, "timestep_map", list(range(steps)))
        sample = None
        first_bad_step = th.full((len(indices),), steps, dtype=th.long, device=self.device)  # per row; steps = never
        for step, out in enumerate(self.steps(indices, draws)):
            sample = out["sample"]
            finite = th.isfinite(sample).flatten(1).all(dim=1)
            first_bad_step = th.where(finite, first_bad_step, first_bad_step.clamp(max=step))
        first_bad_step = first_bad_step.tolist()  # the batch's one read of the device
        if min(first_bad_step) < steps:
            step = min(first_bad_step)
            bad = [i for i, first in zip(indices, first_bad_step) if first < steps]
            shown = ", ".join(str(i) for i in bad[:20]) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
            raise NonFiniteError(
                f"non-finite values in sample(s) {shown} at step {step + 1} of {steps} "
                f"(timestep {timestep_map[steps - 1 - step]}); the run stopped, finished shards in "
                f"{s.out_dir}/shards are intact")
        return to_uint8_nhwc(sample), draws.labels
