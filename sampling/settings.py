"""The run schema: every setting of a sampling run declared once (:data:`SETTINGS`: flag and config key, group,
default, help, check); the group dataclasses, the flags, the defaults of a ``--config`` file or a sweep's ``base:``
and the table of docs/sampling.md are built from it. Precedence, lowest first: defaults, ``--model``'s flags,
``--config FILE.yaml``, the command line. :func:`build_settings` names every problem in one :class:`SampleConfigError`.
"""

import argparse
import dataclasses
import difflib
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from adm_common.yaml_files import parse_yaml, read_yaml

import pag
from pag.config import LIST_SETTINGS
from pag.perturbations import PARAMS as PERTURBATION_PARAMS
from pag.perturbations import REGISTRY as PERTURBATIONS
from guided_diffusion.respace import space_timesteps
from guided_diffusion.script_util import NUM_CLASSES, classifier_defaults, diffusion_defaults
from guided_diffusion.script_util import model_and_diffusion_defaults, str2bool

from .model_configs import DEFAULT_MODEL_DIR, ModelConfigError, load_model_config, model_configs


class SampleConfigError(ValueError):
    """Bad settings or an unusable out_dir; raised on every rank before any sampling."""


@dataclass(frozen=True)
class Setting:
    """One run setting: a flag of scripts/image_sample.py and a config key of the same name."""

    name: str
    group: str
    default: Any
    help: str = ""  # empty for upstream's flags (their meaning is upstream's)
    check: Optional[Callable[[Any], bool]] = None
    requirement: str = ""  # what ``check`` demands, completing "<name> must ...", for the error message

    def problem(self, value):
        """The error message for ``value``, or None when it passes the check."""
        if self.check is None or self.check(value):
            return None
        return f"{self.name} must {self.requirement}, got {value!r}"


COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
LABEL_ORDERS = ("random", "balanced")
EXPECTED = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}  # YAML values
POSITIVE = dict(check=lambda value: value > 0, requirement="be positive")
_DIFFUSION = diffusion_defaults()
CLASSIFIER_FLAGS = tuple(k for k in classifier_defaults() if k != "image_size")


def _upstream(group, defaults, **checks):
    return [Setting(name, group, default, **checks.get(name, {})) for name, default in defaults.items()]


SETTINGS = {setting.name: setting for setting in (
    *_upstream("model", {k: v for k, v in model_and_diffusion_defaults().items() if k not in _DIFFUSION},
               image_size=POSITIVE),
    Setting("model_path", "model", "", "diffusion checkpoint (local path or URL)"),
    Setting("classifier_path", "model", "", "noisy-image classifier checkpoint: enables classifier guidance"),
    Setting("dtype", "model", "",
            "how the U-Net computes: float16 (upstream's use_fp16 torso conversion), bfloat16 (the same conversion "
            "to bfloat16) or float32; empty: float16 with use_fp16, else float32. Changes the samples (run identity)",
            lambda value: not value or value in COMPUTE_DTYPES,
            f"be one of {', '.join(COMPUTE_DTYPES)} (or empty)"),
    *_upstream("model", {k: v for k, v in classifier_defaults().items() if k in CLASSIFIER_FLAGS}),
    *_upstream("diffusion", _DIFFUSION, diffusion_steps=POSITIVE),
    *(Setting(name, "guidance", default, pag.guidance_help()[name])
      for name, default in pag.guidance_defaults().items()),
    Setting("num_samples", "sampling", 10000,
            "number of samples N (indices 0..N-1); a finished run can be extended with a larger N", **POSITIVE),
    Setting("seed", "sampling", 0, "sample i depends only on (seed, i): an integer >= 0",
            lambda value: value >= 0, "be >= 0"),
    Setting("use_ddim", "sampling", False),  # upstream's flags
    Setting("clip_denoised", "sampling", True),
    Setting("num_classes", "sampling", NUM_CLASSES,
            "class labels are drawn uniformly from [0, num_classes) (a model trained on fewer classes)",
            lambda value: 1 <= value <= NUM_CLASSES,
            f"lie in [1, {NUM_CLASSES}] (the model's label embedding)"),
    Setting("shard_size", "sampling", 256, "samples per shard file (the unit of resumption)", **POSITIVE),
    Setting("labels", "sampling", "random",
            "class labels: random (independent uniform draws, upstream's) or balanced (each class num_samples / "
            "num_classes times in a seeded order; sample i's label then also depends on num_samples)",
            lambda value: value in LABEL_ORDERS, f"be one of {', '.join(LABEL_ORDERS)}"),
    Setting("model", "runtime", "",
            "official checkpoint name (configs/models/NAME.yaml) or a model config .yaml path: its flags, and "
            "model_path downloads/models/FILE unless given"),
    Setting("batch_size", "runtime", 16, "samples per forward pass (does not change the samples)", **POSITIVE),
    Setting("out_dir", "runtime", "", "output directory (created; resumed if it holds the same configuration)"),
    Setting("device", "runtime", "", "cpu, cuda or cuda:N (default: the GPU of this process's local rank, else the "
                                     "CPU)"),
    Setting("overwrite", "runtime", False,
            "replace the outputs of a different configuration in out_dir (only files runs write; checked first)"),
    Setting("keep_shards", "runtime", False, "keep the shard files after merging them"),
    Setting("claim_lease", "runtime", 600.0,
            "seconds without a heartbeat after which another process samples a shard claimed by a stalled "
            "one: a positive number", lambda value: value > 0, "be a positive number of seconds"),
    Setting("channels_last", "runtime", False,
            "channels-last memory format for the U-Net's weights (GPU convolutions run NHWC); the same "
            "samples up to float rounding"),
    Setting("compile", "runtime", False,
            "torch.compile the U-Net (the shared prefix and the continuation, once per process, not per step); "
            "the same samples up to float rounding"),
)}
FLAG_GROUP = {name: setting.group for name, setting in SETTINGS.items()}


def _group(name, group, doc):
    return dataclasses.make_dataclass(name, [(s.name, type(s.default), field(default=s.default))
                                             for s in SETTINGS.values() if s.group == group],
                                      namespace={"__doc__": doc, "__module__": __name__})


ModelSettings = _group("ModelSettings", "model", "Upstream's model and classifier flags, and the checkpoints.")
DiffusionSettings = _group("DiffusionSettings", "diffusion", "Upstream's diffusion flags.")
SamplingSettings = _group("SamplingSettings", "sampling", "What, besides the other groups, decides the samples.")
RuntimeSettings = _group("RuntimeSettings", "runtime", "What changes no sample: it may differ on resumption.")
GROUP_CLASSES = dict(model=ModelSettings, diffusion=DiffusionSettings, guidance=pag.GuidanceConfig,
                     sampling=SamplingSettings, runtime=RuntimeSettings)


@dataclass
class RunSettings:
    """Every setting of a run, by group. ``flat()`` gives them by flag name (the run record's form)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)
    guidance: pag.GuidanceConfig = field(default_factory=pag.GuidanceConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def flat(self):
        values = {}
        for group in GROUP_CLASSES:
            values.update(dataclasses.asdict(getattr(self, group)))
        return values

    def identity(self, noise_device):
        """The settings that decide the samples (a run in the same out_dir must have the same): not the runtime ones,
        ``num_samples`` and ``shard_size`` (so a run can be extended), the checkpoint paths (the plan adds their content
        hashes) or those the chosen method does not use (:func:`inapplicable_settings`)."""
        skip = set(NOT_IN_IDENTITY) | set(inapplicable_settings(self))
        ident = {k: v for k, v in self.flat().items() if FLAG_GROUP[k] != "runtime" and k not in skip}
        ident["noise_device"] = noise_device
        # dtype only where it changes the numbers: runs at upstream's precision keep their identity (and resume).
        ident.pop("dtype", None)
        if self.compute_dtype != ("float16" if self.model.use_fp16 else "float32"):
            ident["dtype"] = self.compute_dtype
        for key in OMITTED_AT_DEFAULT:  # settings added later: runs recorded before keep their identity
            if key in ident and ident[key] == SETTINGS[key].default:
                del ident[key]
        if self.sampling.labels == "balanced" and self.with_labels:  # label i depends on num_samples: no extending
            ident["num_samples"] = self.sampling.num_samples
        if self.guidance.uses_pag and PERTURBATIONS[self.guidance.perturbation].random:
            # Random kinds draw afresh at every step since 2026-12 (one draw per sample before): shards of the
            # two definitions must not be merged, so runs recorded before are not resumed (--overwrite).
            ident["perturbation_draws"] = RANDOM_DRAWS_VERSION
        return plain(ident)

    @property
    def compute_dtype(self):
        """How the U-Net computes: ``dtype``, or upstream's choice (a float16 torso with use_fp16)."""
        return self.model.dtype or ("float16" if self.model.use_fp16 else "float32")

    @property
    def out_dir(self):
        return self.runtime.out_dir

    @property
    def with_labels(self):
        """Whether samples get class labels (a class-conditional model, or classifier guidance)."""
        return bool(self.model.class_cond or self.model.classifier_path)


RANDOM_DRAWS_VERSION = "per step, on the device"  # how random perturbations draw (pag.perturbations._RowRandom)
NOT_IN_IDENTITY = ("num_samples", "shard_size", "model_path", "classifier_path")
# In a run's identity only when not at their defaults (so the runs recorded before them keep theirs and resume).
OMITTED_AT_DEFAULT = ("icg_scale", "apg_momentum", "apg_norm_threshold", "apg_eta", "guidance_rescale", "labels")


def sample_defaults():
    """Every setting with its default, by flag name (guidance lists as comma-separated flag strings)."""
    return {name: setting.default for name, setting in SETTINGS.items()}


def default_settings_flat():
    """The defaults as built settings, flat and plain (lists as lists): what a run's values are compared with."""
    return plain(build_settings(dict(sample_defaults(), out_dir="-", model_path="-")).flat())


def settings_markdown():
    """The settings table of docs/sampling.md, from :data:`SETTINGS` (a test keeps the page equal to it)."""
    lines = ["| setting | default | meaning |", "|---|---|---|"]
    lines += [f"| `{s.name}` | `{s.default!r}` | {s.help} |" for s in SETTINGS.values() if s.help]
    upstream = ", ".join(f"`{s.name}` (`{s.default!r}`)" for s in SETTINGS.values() if not s.help)
    return "\n".join(lines + ["", f"Upstream's flags, with upstream's defaults: {upstream}."])


# ------------------------------------------------------------------------------------------ coercion


def suggest(key, known):
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def coerce(key, value, source):
    """A YAML value, or a command-line string, as the type of the setting's default."""
    kind, number = type(SETTINGS[key].default), isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in LIST_SETTINGS and isinstance(value, (list, tuple)):
        return list(value)
    if kind not in EXPECTED:
        return value
    try:
        if kind is bool and isinstance(value, (bool, str)):
            return value if isinstance(value, bool) else str2bool(value)
        if kind is int and (isinstance(value, str) or number and float(value).is_integer()):
            return int(value)
        if kind is float and (isinstance(value, str) or number) and math.isfinite(float(value)):
            return float(value)
        if kind is str and (isinstance(value, str) or number or value is None):
            return "" if value is None else str(value)  # e.g. timestep_respacing: 250
        if kind is str and isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            return ",".join(str(v) for v in value)  # e.g. attention_resolutions: [32, 16, 8]
    except (ValueError, argparse.ArgumentTypeError):
        pass
    raise SampleConfigError(f"{key} in {source}: expected {EXPECTED[kind]}, got {value!r}")


def check_keys(values, source):
    unknown = [k for k in values if k not in SETTINGS]
    if unknown:
        details = ", ".join(f"{k}{suggest(k, SETTINGS)}" for k in unknown)
        raise SampleConfigError(f"unknown setting(s) in {source}: {details}; settings are the flag names "
                                "of scripts/image_sample.py --help")


def coerce_all(values, source):
    check_keys(values, source)
    return {k: coerce(k, v, source) for k, v in values.items()}


def parse_overrides(items):
    """``["num_samples=1000", ...]`` -> ``{"num_samples": 1000}`` (values parsed as YAML scalars)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SampleConfigError(f"--set expects KEY=VALUE, got {item!r}")
        where = f"--set {item}: the value"
        overrides[key.strip()] = parse_yaml(value, where, SampleConfigError) if value.strip() else ""
    return overrides


def read_yaml_mapping(path, what="--config"):
    """A settings YAML file: a mapping of setting names to values ({} when empty)."""
    return read_yaml(path, what, SampleConfigError)


def preset_values(name):
    """Flags and default model_path of ``--model NAME``: an official checkpoint of ``configs/models/``, or
    the path of a model config YAML in that format (its ``file`` is then relative to the YAML's folder)."""
    is_path = str(name).endswith((".yaml", ".yml"))
    try:
        entry = load_model_config(name)
    except ModelConfigError as e:
        if is_path:
            raise SampleConfigError(f"--model {name}: {e}") from None
        entry = None
    if entry is None or entry.get("kind") != "diffusion":
        known = sorted(model for model, config in model_configs().items() if config["kind"] == "diffusion")
        raise SampleConfigError(f"unknown --model {name!r}{suggest(str(name), known)}; the diffusion models of "
                                f"configs/models/ are: {', '.join(known)} (or give a model config .yaml path)")
    model_path = Path(name).parent / entry["file"] if is_path else DEFAULT_MODEL_DIR / entry["file"]
    values = coerce_all(dict(entry.get("flags") or {}), f"--model {name}")
    values["model_path"] = str(model_path)
    return values


def resolve_settings(layers):
    """Defaults < ``--model`` flags < each of ``layers`` ([(source, {flag: value})]): the checked RunSettings."""
    typed = [(source, coerce_all(values, source)) for source, values in layers]
    merged = sample_defaults()
    name = ""
    for _, values in typed:
        name = values.get("model", name)
    if name:
        merged.update(preset_values(name))
    for _, values in typed:
        merged.update(values)
    return build_settings(merged)


def build_settings(values):
    """Check flat settings and build the :class:`RunSettings`; every problem is named in one error."""
    s = dict(values)
    problems = [problem for name, setting in SETTINGS.items() if (problem := setting.problem(s[name]))]
    if s["icg_scale"] and not s["class_cond"]:
        problems.append(f"icg_scale {s['icg_scale']} needs a class-conditional model (class_cond true): an "
                        "unconditional model has no label to replace")
    for param in PERTURBATION_PARAMS.values():  # every kind's parameters, also those the chosen kind ignores
        try:
            param.validate(s[param.name])
        except ValueError as e:
            problems.append(str(e))
    if not s["classifier_path"] and s["classifier_scale"] != SETTINGS["classifier_scale"].default:
        problems.append(f"classifier_scale {s['classifier_scale']} is set but there is no classifier: add "
                        "--classifier_path FILE, or leave classifier_scale out")
    if not s["out_dir"]:
        problems.append("out_dir is required (--out_dir DIR)")
    if not s["model_path"]:
        problems.append("model_path is required: --model_path FILE, or --model NAME for an official "
                        "checkpoint (configs/models/)")
    if s["device"]:
        import torch as th

        try:
            th.device(s["device"])
        except (RuntimeError, ValueError):
            problems.append(f"device {s['device']!r} is not a torch device (cpu, cuda, cuda:N)")
    if s["diffusion_steps"] > 0:
        try:
            space_timesteps(s["diffusion_steps"], s["timestep_respacing"] or [s["diffusion_steps"]])
        except ValueError as e:
            problems.append(f"timestep_respacing {s['timestep_respacing']!r}: {e}")
    guidance = None
    try:
        guidance = pag.GuidanceConfig.from_dict({k: s[k] for k in s if FLAG_GROUP.get(k) == "guidance"})
    except (TypeError, ValueError) as e:
        problems.append(f"guidance settings: {e}")
    if problems:
        raise SampleConfigError("; ".join(problems))
    groups = {group: cls(**{k: s[k] for k in s if FLAG_GROUP.get(k) == group})
              for group, cls in GROUP_CLASSES.items() if group != "guidance"}
    return RunSettings(guidance=guidance, **groups)


def plain(obj):
    """As it reads back from YAML (tuples as lists), so that comparisons are like for like."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return [plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def inapplicable_settings(settings):
    """{setting: why it does not apply} for the settings the chosen method does not use: they change no image,
    so they are not part of the run's identity (and set to other than their defaults, they are warned about)."""
    g, out = settings.guidance, {}
    if not g.uses_pag:
        for key in ("pag_layers", "pag_heads", "perturbation", "pag_schedule", "pag_scale_end",
                    "pag_adaptive_scale", *PERTURBATION_PARAMS):
            out[key] = "pag_scale is 0"
    else:
        if g.pag_schedule != "linear":
            out["pag_scale_end"] = f"pag_schedule is {g.pag_schedule}"
        if g.pag_schedule != "adaptive":
            out["pag_adaptive_scale"] = f"pag_schedule is {g.pag_schedule}"
        used = PERTURBATIONS[g.perturbation].params
        for key in PERTURBATION_PARAMS:
            if key not in used:
                out[key] = f"perturbation {g.perturbation} does not use it"
    if not g.sag_scale:
        out["sag_layer"] = out["sag_blur_sigma"] = "sag_scale is 0"
    if not g.uses_pag and not g.sag_scale and not g.icg_scale:
        out["guidance_interval"] = "neither PAG, SAG nor ICG is on"
        for key in ("apg_momentum", "apg_norm_threshold", "apg_eta", "guidance_rescale"):
            out[key] = "there is no guidance term (PAG, SAG or ICG)"
    if not settings.with_labels:
        out["labels"] = "the samples have no labels (an unconditional model without a classifier)"
    if not settings.model.classifier_path:
        for key in ("classifier_scale",) + CLASSIFIER_FLAGS:
            out[key] = "there is no classifier_path"
    return out


def settings_warnings(settings):
    """A line for each setting given another value than its default that the chosen method does not use."""
    defaults = default_settings_flat()
    values = plain(settings.flat())
    return [f"{key} = {values[key]!r} is ignored: {why}"
            for key, why in inapplicable_settings(settings).items() if values[key] != defaults[key]]


def config_differences(old, new):
    """Lines naming each setting that differs between a recorded identity and a new one: only the new identity's
    settings count, and a setting added after that run is no difference while it has its default."""
    defaults = default_settings_flat()
    lines = []
    for key in sorted(new):
        if key not in old:
            if new[key] == defaults.get(key, "<none>"):
                continue  # a setting added after that run, at its default
            lines.append(f"{key}: <unset> there, {new[key]!r} now")
        elif old[key] != new[key]:
            lines.append(f"{key}: {old[key]!r} there, {new[key]!r} now")
    if "dtype" in old and "dtype" not in new:  # recorded only off upstream's precision (RunSettings.identity)
        lines.append(f"dtype: {old['dtype']!r} there, upstream's (use_fp16) now")
    for key in OMITTED_AT_DEFAULT:  # recorded off its default, left out of the new identity at its default
        if key in old and key not in new and old[key] != SETTINGS[key].default:
            lines.append(f"{key}: {old[key]!r} there, {SETTINGS[key].default!r} (the default) now")
    return lines


def to_command(settings, script="scripts/image_sample.py"):
    """The image_sample.py command line for ``settings``: every flag that differs from its default."""
    defaults = default_settings_flat()
    values = settings.flat()
    parts = ["python", script]
    first = ["model_path", "out_dir"]
    for key in first + [k for k in values if k not in first]:
        value = values[key]
        if key == "model" or plain(value) == plain(defaults[key]):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts += [f"--{key}", shlex.quote(str(value))]
    return " ".join(parts)


def sampler_label(settings):
    """``DDPM-250``, ``DDIM-25``, ...: the sampler as tables name it."""
    respacing = settings.diffusion.timestep_respacing
    ddim = settings.sampling.use_ddim or respacing.startswith("ddim")
    steps = "+".join(s for s in respacing.replace("ddim", "").split(",") if s) if respacing else ""
    return f"{'DDIM' if ddim else 'DDPM'}-{steps or settings.diffusion.diffusion_steps}"
