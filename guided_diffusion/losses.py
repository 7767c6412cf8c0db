"""Likelihood helpers for the variational bound: Gaussian KL and a discretised Gaussian decoder.

Same formulas (and the same numeric tricks) as upstream guided-diffusion, so loss values agree.
"""

import math

import torch as th

# Half-width of one 8-bit pixel bin once pixels are scaled to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Floor for probabilities before the log, so empty bins give a large finite loss instead of -inf.
_PROB_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast, so any of them may be a Python number as long as one is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, th.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # th.exp does not take Python floats, so the log-variances must be tensors.
    logvar1 = logvar1 if isinstance(logvar1, th.Tensor) else th.tensor(logvar1).to(ref)
    logvar2 = logvar2 if isinstance(logvar2, th.Tensor) else th.tensor(logvar2).to(ref)
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Standard normal CDF via the tanh approximation (the one the original diffusion code used)."""
    return 0.5 * (1.0 + th.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats, elementwise) of 8-bit images x in [-1, 1] under N(means, exp(log_scales)^2).

    Each pixel value owns a bin of width 2/255; the two extreme values own everything beyond
    them (so the probabilities of all 256 values sum to one).
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centred = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + _HALF_BIN))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - _HALF_BIN))
    log_below_upper = th.log(cdf_upper.clamp(min=_PROB_FLOOR))  # bin of the value -1: (-inf, upper]
    log_above_lower = th.log((1.0 - cdf_lower).clamp(min=_PROB_FLOOR))  # bin of +1: [lower, inf)
    log_in_bin = th.log((cdf_upper - cdf_lower).clamp(min=_PROB_FLOOR))
    return th.where(x < -0.999, log_below_upper, th.where(x > 0.999, log_above_lower, log_in_bin))
