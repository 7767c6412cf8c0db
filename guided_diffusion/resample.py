"""Timestep samplers for training: which t each batch element is trained on, and its importance weight."""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist


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
        """Record this process's (timestep, loss) pairs.

        With torch.distributed initialised, the pairs of all ranks are gathered first so every rank
        updates with the same data and keeps the same weights; otherwise they are used directly.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return

        world = dist.get_world_size()
        # all_gather needs equal sizes: share the batch sizes, pad to the largest, then trim.
        sizes = [th.zeros(1, dtype=th.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        max_size = max(sizes)

        def padded(x):
            out = th.zeros(max_size, dtype=x.dtype, device=x.device)
            out[: len(x)] = x
            return out

        ts_batches = [th.zeros(max_size).to(local_ts) for _ in sizes]
        loss_batches = [th.zeros(max_size).to(local_losses) for _ in sizes]
        dist.all_gather(ts_batches, padded(local_ts))
        dist.all_gather(loss_batches, padded(local_losses))
        timesteps = [int(v) for batch, n in zip(ts_batches, sizes) for v in batch[:n].tolist()]
        losses = [float(v) for batch, n in zip(loss_batches, sizes) for v in batch[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

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
