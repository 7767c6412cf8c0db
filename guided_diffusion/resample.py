"""Timestep samplers for training: which t each batch element is trained on, and its importance weight."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th

from . import dist_util


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    """A distribution over timesteps used for importance sampling.

    sample() returns weights 1 / (T * p(t)), so the weighted loss has the same expectation as
    with uniform t; only its variance changes.
    """

    @abstractmethod
    def weights(self):
        """Positive, not necessarily normalised, numpy weights, one per diffusion step."""

    def sample(self, batch_size, device):
        """(timesteps, weights): a long tensor of step indices and a float tensor of loss weights."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights = th.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow recent losses."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Record this process's (timestep, loss) pairs; under torch.distributed every rank's pairs are
        gathered first, so all ranks update with the same data and keep the same weights."""
        everyone = dist_util.all_gather_object((local_ts.tolist(), local_losses.tolist()))
        self.update_with_all_losses([int(t) for ts, _ in everyone for t in ts],
                                    [float(loss) for _, losses in everyone for loss in losses])

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from lists of int timesteps and float losses (same data on every rank)."""


class LossSecondMomentResampler(LossAwareSampler):
    """Sample t with probability proportional to sqrt(E[loss_t^2]) over the last few losses.

    Uniform until every step has `history_per_term` losses; a `uniform_prob` share of the mass always
    stays uniform so no step's probability drops to zero.
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss and append the newest.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return bool((self._loss_counts == self.history_per_term).all())
