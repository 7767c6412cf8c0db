"""Perturbed-Attention Guidance (Ahn et al., ECCV 2024) for ADM models.

The guidance formula is ``pag.guidance.guidance_step``; ``pag.guide`` wraps a model with it.
"""

from .classifier import classifier_cond_fn
from .config import GuidanceConfig, guidance_defaults, guidance_help
from .guidance import GuidedModel, guidance_step, guide
from .layers import PAPER_LAYERS_256, format_attention_blocks, resolve_layers
from .perturbations import (
    PARAMS,
    REGISTRY,
    PerturbationParams,
    attention_overrides,
    make_attention_fn,
    perturbation_names,
    perturbed_attention,
)

__all__ = [
    "GuidanceConfig",
    "GuidedModel",
    "PAPER_LAYERS_256",
    "PARAMS",
    "REGISTRY",
    "PerturbationParams",
    "attention_overrides",
    "classifier_cond_fn",
    "format_attention_blocks",
    "guidance_defaults",
    "guidance_help",
    "guidance_step",
    "guide",
    "make_attention_fn",
    "perturbation_names",
    "perturbed_attention",
    "resolve_layers",
]
