"""Classifier guidance (Dhariwal & Nichol, 2021) as upstream's ``cond_fn``."""

import torch as th
import torch.nn.functional as F


def classifier_cond_fn(classifier, scale):
    """``cond_fn(x, t, y)`` returning ``scale * grad_x log p(y | x_t)`` for the diffusion's samplers.

    DDPM applies it with ``condition_mean``, DDIM with ``condition_score`` (upstream's choice); combined
    with PAG it acts on the PAG-guided prediction, as the authors combine them.
    """
    if scale < 0:
        raise ValueError(f"classifier scale must be >= 0, got {scale}")

    def cond_fn(x, t, y=None, **_ignored):
        if y is None:
            raise ValueError(
                "classifier guidance needs class labels: pass model_kwargs={'y': labels} "
                "(for an unconditional model, sample the labels to guide towards)"
            )
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[th.arange(len(y), device=y.device), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn
