"""Timestep respacing: sample with a subset of a trained process's steps (e.g. 250 of 1000, or DDIM's 25).

The respaced process keeps the original alpha_bar at each kept step and re-derives its betas from
them; the model still sees the original timesteps, because that is what it was trained on.
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original steps to keep. ``section_counts`` ("250", "10,10,5" or a list) cuts the steps into that
    many equal sections (earlier ones take the remainder), each keeping its count evenly spaced from its first to its
    last step; "ddimN" keeps range(0, T, stride) for the integer stride giving exactly N steps (the DDIM paper)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired:
                    return set(steps)
            raise ValueError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]

    n_sections = len(section_counts)
    base_size, remainder = divmod(num_timesteps, n_sections)
    kept = []
    section_start = 0
    for i, count in enumerate(section_counts):
        size = base_size + (1 if i < remainder else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        # Fractional stride so that the section's first and last steps are both kept.
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            # Python's round (half to even) on the accumulated float, as upstream, so the kept
            # steps are exactly upstream's.
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over ``use_timesteps``, a subset of the steps of the process ``kwargs`` describe."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)

        # For kept steps s_0 < s_1 < ..., beta_k = 1 - abar(s_k) / abar(s_{k-1}), so the new
        # process's alpha_bar equals the original's at every kept step.
        self.timestep_map = []
        new_betas = []
        prev_alpha_cumprod = 1.0
        for step, alpha_cumprod in enumerate(base.alphas_cumprod):
            if step in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / prev_alpha_cumprod)
                prev_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(step)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        self._timestep_tensors = {}  # the wrappers' (device, dtype) -> timestep_map tensors, copied there once

    # Everything that calls the model or a classifier goes through these, so wrapping here covers
    # sampling, guidance and training.
    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):  # already maps indices; mapping twice would be wrong
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps,
                             self._timestep_tensors)

    def _scale_timesteps(self, t):
        # The wrapper maps (and, if asked, rescales) timesteps, so nothing is done here.
        return t


class _WrappedModel:
    """Calls `model` with original timesteps in place of the respaced process's step indices (upstream's
    signature; ``tensors`` caches the map per device and dtype across the wrappers of a process, one per step)."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps, tensors=None):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self.tensors = {} if tensors is None else tensors

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        if key not in self.tensors:
            self.tensors[key] = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = self.tensors[key][ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)
