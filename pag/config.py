"""Guidance settings: one dataclass that round-trips through YAML and command-line flags.

The perturbation parameters (``drop_rate``, ``blur_sigma``, ...) are fields generated from the perturbation
registry (``pag.perturbations.PARAMS``): a new perturbation kind adds its fields here by itself.
"""

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import List

import torch as th

from .layers import PAPER_LAYERS_256, split_layer_list
from .perturbations import PARAMS, PerturbationParams, perturbation_names, validate_perturbation

SCHEDULES = ("constant", "linear", "adaptive")
LIST_SETTINGS = ("pag_layers", "guidance_interval", "pag_heads")  # lists: comma-separated as flags

GUIDANCE_HELP = {
    "pag_scale": "PAG scale s of eps + s * (eps - eps_perturbed): a finite number; 0 = no PAG, one forward pass "
                 "per step (the authors' --guide_scale is 1 + s)",
    "pag_layers": "comma-separated attention blocks (names or globs, as in model.named_modules()) to perturb",
    "pag_heads": "comma-separated head indices the perturbation applies to in every perturbed block, the other "
                 "heads attending normally (SoftPAG's head selection, Ahn et al. 2025); empty = all heads; not "
                 "with skip",
    "perturbation": "how the attention of pag_layers is perturbed: one of " + ", ".join(perturbation_names()),
    "guidance_interval": "lo,hi: original timesteps where PAG/SAG apply",
    "pag_schedule": "how s changes over the timesteps: one of " + ", ".join(SCHEDULES),
    "pag_scale_end": "linear schedule: s at t = 0",
    "pag_adaptive_scale": "adaptive schedule: max(0, s - pag_adaptive_scale * (1000 - t))",
    "sag_scale": "self-attention guidance scale: a finite number; 0 = no SAG (Hong et al. 2023; their "
                 "--guide_scale is 1 + sag_scale)",
    "sag_layer": "attention block whose map SAG reads",
    "sag_blur_sigma": "SAG's Gaussian blur sigma",
    "classifier_scale": "classifier guidance scale (needs --classifier_path)",
    "icg_scale": "independent condition guidance w of eps(x, y) + w * (eps(x, y) - eps(x, y')), y' a random class "
                 "per sample and step (Sadat et al. 2025); class-conditional models only; 0 = off",
    "apg_momentum": "adaptive projected guidance: momentum beta on the guidance term in x0 space, in (-1, 1); "
                    "0 = off (Sadat et al. 2025)",
    "apg_norm_threshold": "adaptive projected guidance: cap on the per-sample norm of the guidance term in x0 "
                          "space; 0 = off",
    "apg_eta": "adaptive projected guidance: weight of the guidance term's component parallel to the clean x0 "
               "prediction; 1 = plain guidance",
    "guidance_rescale": "guidance rescale phi in [0, 1]: blend toward the guided eps rescaled to the clean eps's "
                        "per-sample std (Lin et al. 2023); 0 = off",
}


@dataclass
class _GuidanceSettings:
    """Every guidance setting of a sampling run.

    pag_scale is the paper's s: ``eps + s * (eps - eps_perturbed)``. The PAG authors' code calls
    ``1 + s`` its ``--guide_scale`` (their scripts' 4.0 is s = 3.0). s = 0 is the unguided model, one
    forward pass per step.
    """

    pag_scale: float = 0.0
    pag_layers: List[str] = field(default_factory=lambda: list(PAPER_LAYERS_256))
    # Head indices the perturbation applies to in every perturbed block (empty: all heads).
    pag_heads: List[int] = field(default_factory=list)
    perturbation: str = "identity"
    # Original (1000-step) timesteps [lo, hi], both included, where PAG and SAG are on.
    guidance_interval: List[int] = field(default_factory=lambda: [0, 1000])
    # constant: s. linear: s at t = T-1 to pag_scale_end at t = 0.
    # adaptive: diffusers' pag_adaptive_scale, max(0, s - pag_adaptive_scale * (1000 - t)).
    pag_schedule: str = "constant"
    pag_scale_end: float = 0.0
    pag_adaptive_scale: float = 0.0
    # Self-attention guidance (Hong et al., 2023); their --guide_scale is 1 + sag_scale.
    sag_scale: float = 0.0
    sag_layer: str = "output_blocks.2.1"
    sag_blur_sigma: float = 9.0
    # Classifier guidance (upstream's --classifier_scale and its default), applied after PAG/SAG through cond_fn
    # and only with a classifier.
    classifier_scale: float = 1.0
    # Independent condition guidance (Sadat et al., ICLR 2025): eps(x, y) + w * (eps(x, y) - eps(x, y')), y' an
    # independent random class per sample and step. Inside guidance_interval, as PAG and SAG.
    icg_scale: float = 0.0
    # Adaptive projected guidance (Sadat et al., ICLR 2025) on the summed PAG + SAG + ICG term, in x0 space:
    # momentum beta, per-sample norm cap, weight of the part parallel to the clean x0. Defaults: plain guidance.
    apg_momentum: float = 0.0
    apg_norm_threshold: float = 0.0
    apg_eta: float = 1.0
    # Guidance rescale (Lin et al., 2023): phi of phi * guided * std(eps) / std(guided) + (1 - phi) * guided.
    guidance_rescale: float = 0.0

    def __post_init__(self):
        self.pag_layers = split_layer_list(self.pag_layers)
        if isinstance(self.pag_heads, str):
            try:
                self.pag_heads = [int(v) for v in self.pag_heads.split(",") if v.strip()]
            except ValueError:
                raise ValueError(f"pag_heads must be comma-separated integers, got {self.pag_heads!r}") from None
        self.pag_heads = list(self.pag_heads)
        if isinstance(self.guidance_interval, str):
            self.guidance_interval = [int(v) for v in self.guidance_interval.split(",")]
        self.guidance_interval = [int(v) for v in self.guidance_interval]
        self.validate()

    @property
    def perturbation_params(self):
        return PerturbationParams(**{name: getattr(self, name) for name in PARAMS})

    def validate(self, num_timesteps=1000):
        """Raise a ValueError naming the bad setting; called on construction (and by ``guide`` for a
        diffusion whose step count is not 1000)."""
        for name in ("pag_scale", "pag_scale_end", "pag_adaptive_scale", "sag_scale", "sag_blur_sigma",
                     "classifier_scale", "icg_scale", "apg_momentum", "apg_norm_threshold", "apg_eta",
                     "guidance_rescale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.perturbation, str) or self.perturbation not in perturbation_names():
            raise ValueError(f"unknown perturbation {self.perturbation!r}; choose one of "
                             f"{', '.join(perturbation_names())}")
        validate_perturbation(self.perturbation, self.perturbation_params, self.pag_heads)
        if self.pag_schedule not in SCHEDULES:
            raise ValueError(f"pag_schedule must be one of {', '.join(SCHEDULES)}, got {self.pag_schedule!r}")
        if len(self.guidance_interval) != 2:
            raise ValueError(f"guidance_interval must be [lo, hi], got {self.guidance_interval}")
        lo, hi = self.guidance_interval
        if not 0 <= lo <= hi <= num_timesteps:
            raise ValueError(
                f"guidance_interval {self.guidance_interval} must satisfy 0 <= lo <= hi <= {num_timesteps} "
                "(original timesteps)"
            )
        if self.pag_scale and not self.pag_layers:
            raise ValueError("pag_scale is set but pag_layers is empty")
        if self.sag_scale and self.sag_blur_sigma <= 0:
            raise ValueError(f"sag_blur_sigma must be > 0, got {self.sag_blur_sigma}")
        if self.classifier_scale < 0:
            raise ValueError(f"classifier_scale must be >= 0, got {self.classifier_scale}")
        if not -1 < self.apg_momentum < 1:
            raise ValueError(f"apg_momentum must lie in (-1, 1), got {self.apg_momentum}")
        if self.apg_norm_threshold < 0:
            raise ValueError(f"apg_norm_threshold must be >= 0 (0 = no cap), got {self.apg_norm_threshold}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {self.guidance_rescale}")

    @property
    def uses_apg(self):
        """Whether adaptive projected guidance changes anything (else the plain sum is used, bit for bit)."""
        return self.apg_momentum != 0 or self.apg_norm_threshold != 0 or self.apg_eta != 1

    @property
    def uses_pag(self):
        return self.pag_scale != 0 or (self.pag_schedule == "linear" and self.pag_scale_end != 0)

    def pag_scale_at(self, t, num_timesteps=1000):
        """PAG scale per batch row at original timesteps ``t`` (0 outside the interval)."""
        t = t.float()
        if self.pag_schedule == "constant":
            scale = th.full_like(t, float(self.pag_scale))
        elif self.pag_schedule == "linear":
            frac = t / max(num_timesteps - 1, 1)
            scale = self.pag_scale_end + (self.pag_scale - self.pag_scale_end) * frac
        else:
            scale = (self.pag_scale - self.pag_adaptive_scale * (1000 - t)).clamp(min=0)
        return scale * self.in_interval(t)

    def constant_pag_scale(self, num_timesteps=1000):
        """PAG's scale when it is the same at every timestep (constant schedule, an interval covering
        0..num_timesteps - 1), else None: the guided model then decides on the host whether to guide."""
        return float(self.pag_scale) if self.pag_schedule == "constant" and self._interval_covers(
            num_timesteps) else None

    def constant_sag_scale(self, num_timesteps=1000):
        return float(self.sag_scale) if self._interval_covers(num_timesteps) else None

    def _interval_covers(self, num_timesteps):
        lo, hi = self.guidance_interval
        return lo <= 0 and hi >= num_timesteps - 1

    def sag_scale_at(self, t):
        return th.full_like(t.float(), float(self.sag_scale)) * self.in_interval(t)

    def constant_icg_scale(self, num_timesteps=1000):
        return float(self.icg_scale) if self._interval_covers(num_timesteps) else None

    def icg_scale_at(self, t):
        return th.full_like(t.float(), float(self.icg_scale)) * self.in_interval(t)

    def in_interval(self, t):
        lo, hi = self.guidance_interval
        return ((t >= lo) & (t <= hi)).float()

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a mapping (YAML, flags); unknown keys are an error naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown guidance settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**dict(values))


GuidanceConfig = dataclasses.make_dataclass(
    "GuidanceConfig",
    [(p.name, type(p.default), field(default=p.default)) for p in PARAMS.values()],
    bases=(_GuidanceSettings,),
)
GuidanceConfig.__doc__ = _GuidanceSettings.__doc__ + (
    "\n    Perturbation parameters (from the registry): " + ", ".join(PARAMS) + ".\n")
GuidanceConfig.__module__ = __name__


def guidance_help():
    """Flag help of each guidance setting (perturbation parameters from the registry)."""
    return dict(GUIDANCE_HELP, **{p.name: p.help for p in PARAMS.values()})


def guidance_defaults():
    """Flag defaults for ``add_dict_to_argparser`` (lists become comma-separated strings)."""
    defaults = GuidanceConfig().to_dict()
    for name in LIST_SETTINGS:
        defaults[name] = ",".join(str(v) for v in defaults[name])
    return defaults
