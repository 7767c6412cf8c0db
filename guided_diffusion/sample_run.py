"""Sampling at scale: per-sample seeds, sharded resumable output, any number of processes.

``scripts/image_sample.py`` is a thin front end to :func:`main`; ``scripts/sweep.py`` runs many settings
through :func:`prepare`, :func:`load_models`, :class:`Sampler` and :func:`execute`.

Settings. Upstream guided-diffusion's flags (model, diffusion and classifier flags, ``--model_path``,
``--num_samples``, ``--batch_size``, ``--use_ddim``, ``--clip_denoised``, ``--classifier_path``,
``--classifier_scale``), the guidance flags of :func:`pag.guidance_defaults`, and ours (``--seed``,
``--out_dir``, ``--shard_size``, ``--device``, ``--overwrite``, ``--keep_shards``, ``--model NAME`` for
the flags and path of an official checkpoint in ``configs/models/``). Precedence, lowest first:
defaults, ``--model``'s flags, ``--config FILE.yaml`` (keys are flag names), the command line.

Randomness. Sample i's class label, its x_T and every step's noise come from generators seeded with
``(seed, i)`` only (the noise generator lives on the sampling device, so CPU and GPU runs differ), and
random perturbations get a per-sample ``row_seeds`` from the same pair: a sample does not depend on
the batch size, the number of processes or which process drew it.

Output (``--out_dir``). Samples ``[k * shard_size, (k + 1) * shard_size)`` form shard k, written to
``shards/shard_{k:06d}.npz`` atomically once complete; processes take the unfinished shards round-robin.
When all exist, rank 0 streams them into ``samples_{N}x{H}x{W}x3.npz`` (upstream's format: ``arr_0`` uint8
NHWC, ``arr_1`` int64 labels when there are labels), draws ``grid.png`` from the first 64 samples and
removes the shards (``--keep_shards`` keeps them). ``config.yaml`` records every setting, the versions
and the git commit; ``log.txt`` (``log.rankN.txt`` for other ranks) a line per shard.

Resume. The same command again skips finished shards and ends with the same npz; any batch size or
process count may be used. A different configuration in the same directory is refused with the
differing settings named; ``--overwrite`` deletes that run's samples and starts afresh (the same
configuration always resumes, so a requeued ``--overwrite`` job never loses work). Multi-node runs need
``--out_dir`` on a shared file system.
"""

import argparse
import dataclasses
import datetime
import difflib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th
import yaml

import pag

from . import dist_util, logger, sample_io
from .checkpoint import CheckpointError, check_state_dict
from .model_config import CONFIG_DIR as MODEL_CONFIG_DIR, load_model_config, model_configs
from .respace import space_timesteps
from .script_util import (
    NUM_CLASSES,
    classifier_defaults,
    create_classifier,
    create_gaussian_diffusion,
    create_model,
    model_and_diffusion_defaults,
    str2bool,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path("downloads") / "models"

# Test hook: a process kills itself (SIGKILL, no clean-up) after writing this many shards.
KILL_AFTER_SHARDS_ENV = "PAG_SAMPLE_KILL_AFTER_SHARDS"
POLL_SECONDS = 0.5

SAMPLING_DEFAULTS = dict(
    clip_denoised=True,
    num_samples=10000,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,  # upstream's default; used only with --classifier_path
    seed=0,
    shard_size=256,
    num_classes=NUM_CLASSES,  # labels are drawn uniformly from [0, num_classes)
)
# Settings that do not change the samples: they may differ between a run and its resumption.
RUNTIME_DEFAULTS = dict(
    model="",
    batch_size=16,
    out_dir="",
    device="",
    overwrite=False,
    keep_shards=False,
)

HELP = {
    "model": "official checkpoint name (configs/models/NAME.yaml): its flags, and model_path "
             "downloads/models/FILE unless given",
    "model_path": "diffusion checkpoint (local path or URL)",
    "classifier_path": "noisy-image classifier checkpoint: enables classifier guidance",
    "num_samples": "number of samples N (indices 0..N-1)",
    "batch_size": "samples per forward pass (does not change the samples)",
    "seed": "sample i depends only on (seed, i)",
    "num_classes": "class labels are drawn uniformly from [0, num_classes) (a model trained on fewer classes)",
    "shard_size": "samples per shard file (the unit of resumption)",
    "out_dir": "output directory (created; resumed if it holds the same configuration)",
    "device": "cpu, cuda or cuda:N (default: the GPU of this process's local rank, else the CPU)",
    "overwrite": "replace the outputs of a different configuration in out_dir",
    "keep_shards": "keep the shard files after merging them",
    "pag_layers": "comma-separated attention blocks (names or globs) to perturb",
    "guidance_interval": "lo,hi: original timesteps where PAG/SAG apply",
}

OUTPUT_FILES = ("config.yaml", "grid.png", "eval.json")
SHARD_DIR, PROGRESS_DIR, FAILED_DIR = "shards", ".progress", ".failed"


class SampleConfigError(ValueError):
    """Bad settings or an unusable out_dir; raised on every rank before any sampling."""


class NonFiniteError(RuntimeError):
    """A sample became NaN or infinite."""


class PeerFailedError(RuntimeError):
    """Another process of the run failed."""


# ------------------------------------------------------------------------------------------ settings


def guidance_keys():
    return list(pag.guidance_defaults())


def sample_defaults():
    """Every setting with its default (upstream's flags, guidance flags, ours)."""
    defaults = {}
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(pag.guidance_defaults())
    defaults.update(SAMPLING_DEFAULTS)
    defaults.update(RUNTIME_DEFAULTS)
    return defaults


def _flag_type(default):
    if isinstance(default, bool):
        return str2bool
    return str if default is None else type(default)


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="settings file (keys are flag names); command-line flags win")
    for key, default in sample_defaults().items():
        kwargs = dict(type=_flag_type(default), default=argparse.SUPPRESS,
                      help=f"{HELP.get(key, '')} (default: {default!r})".strip())
        if isinstance(default, bool):
            kwargs.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{key}", **kwargs)
    return parser


def _suggest(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def coerce(key, value, default, source):
    """A YAML value as the type of the flag's default (as the command line would give it)."""
    where = f"{key} in {source}"
    if key in pag.guidance_defaults() and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return str2bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise SampleConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise SampleConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise SampleConfigError(f"{where}: expected a number, got {value!r}")
    if isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            return ",".join(str(v) for v in value)  # e.g. attention_resolutions: [32, 16, 8]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. timestep_respacing: 250
        if isinstance(value, str):
            return value
        raise SampleConfigError(f"{where}: expected a string, got {value!r}")
    return value


def check_keys(values, source, allowed=None):
    known = list(allowed if allowed is not None else sample_defaults())
    unknown = [k for k in values if k not in known]
    if unknown:
        details = ", ".join(f"{k}{_suggest(k, known)}" for k in unknown)
        raise SampleConfigError(f"unknown setting(s) in {source}: {details}; settings are the flag names "
                                "of scripts/image_sample.py --help")


def coerce_all(values, source):
    check_keys(values, source)
    defaults = sample_defaults()
    return {k: coerce(k, v, defaults[k], source) for k, v in values.items()}


def read_yaml_mapping(path, what="--config"):
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SampleConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SampleConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SampleConfigError(f"{what} {path} must hold a mapping of setting names to values")
    return data


def preset_values(name):
    """Flags and default model_path of ``--model NAME``: an official checkpoint of ``configs/models/``, or
    the path of a model config YAML in that format (its ``file`` is then relative to the YAML's folder)."""
    if str(name).endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.exists():
            raise SampleConfigError(f"--model {name}: no such model config file")
        entry = load_model_config(path)
        model_path = path.parent / entry["file"]
    else:
        presets = model_configs(MODEL_CONFIG_DIR)
        entry = presets.get(name)
        model_path = DEFAULT_MODEL_DIR / entry["file"] if entry else None
    if entry is None or entry.get("kind") != "diffusion":
        presets = model_configs(MODEL_CONFIG_DIR)
        known = sorted(n for n, e in presets.items() if e.get("kind") == "diffusion")
        raise SampleConfigError(f"unknown --model {name!r}{_suggest(name, known)}; the diffusion models of "
                                f"configs/models/ are: {', '.join(known)} (or give a model config .yaml path)")
    values = coerce_all(dict(entry.get("flags") or {}), f"--model {name}")
    values["model_path"] = str(model_path)
    return values


def resolve_settings(layers):
    """Defaults < ``--model`` flags < each layer in order. ``layers``: [(source, {flag: value})]."""
    typed = [(source, coerce_all(values, source)) for source, values in layers]
    merged = dict(sample_defaults())
    name = ""
    for _, values in typed:
        name = values.get("model", name)
    if name:
        merged.update(preset_values(name))
    for _, values in typed:
        merged.update(values)
    return finalize(merged)


def resolve_cli(argv=None):
    """Settings from the command line (and its ``--config`` file)."""
    given = vars(build_parser().parse_args(argv))
    config = given.pop("config", None)
    layers = [(f"--config {config}", read_yaml_mapping(config))] if config else []
    layers.append(("the command line", given))
    return resolve_settings(layers)


def finalize(settings):
    """Check settings and normalize the guidance ones; every problem is named in one error."""
    s = dict(settings)
    problems = []
    for key in ("num_samples", "batch_size", "shard_size", "image_size", "diffusion_steps"):
        if s[key] <= 0:
            problems.append(f"{key} must be positive, got {s[key]}")
    if not 1 <= s["num_classes"] <= NUM_CLASSES:
        problems.append(f"num_classes must lie in [1, {NUM_CLASSES}] (the model's label embedding), "
                        f"got {s['num_classes']}")
    if s["seed"] < 0:
        problems.append(f"seed must be >= 0, got {s['seed']}")
    if not s["out_dir"]:
        problems.append("out_dir is required (--out_dir DIR)")
    if not s["model_path"]:
        problems.append("model_path is required: --model_path FILE, or --model NAME for an official "
                        "checkpoint (configs/models/)")
    if s["device"]:
        try:
            th.device(s["device"])
        except (RuntimeError, ValueError):
            problems.append(f"device {s['device']!r} is not a torch device (cpu, cuda, cuda:N)")
    if s["diffusion_steps"] > 0:
        try:
            space_timesteps(s["diffusion_steps"], s["timestep_respacing"] or [s["diffusion_steps"]])
        except ValueError as e:
            problems.append(f"timestep_respacing {s['timestep_respacing']!r}: {e}")
    try:
        guidance = pag.GuidanceConfig.from_dict({k: s[k] for k in guidance_keys()})
        s.update(guidance.to_dict())
    except (TypeError, ValueError) as e:
        problems.append(f"guidance settings: {e}")
    if problems:
        raise SampleConfigError("; ".join(problems))
    return s


def _plain(obj):
    """As it reads back from YAML (tuples -> lists, ...), so that comparisons are like for like."""
    return yaml.safe_load(yaml.safe_dump(obj))


def identity(settings, device_type):
    """The settings that decide the samples (a run in the same out_dir must have the same)."""
    ident = {k: v for k, v in settings.items() if k not in RUNTIME_DEFAULTS}
    ident["noise_device"] = device_type
    return _plain(ident)


def _default_identity(device_type):
    values = dict(sample_defaults(), out_dir="-", model_path="-")
    return identity(finalize(values), device_type)


def config_differences(old, new, device_type):
    """Lines naming each setting that differs between a recorded identity and a new one."""
    defaults = _default_identity(device_type)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key not in old and key in new and new[key] == defaults.get(key):
            continue  # a setting added after that run, at its default
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            lines.append(f"{key}: {old.get(key, '<unset>')!r} there, {new.get(key, '<unset>')!r} now")
    return lines


def to_command(settings, script="scripts/image_sample.py"):
    """The image_sample.py command line for ``settings``: every flag that differs from its default."""
    defaults = finalize(dict(sample_defaults(), out_dir="-", model_path="-"))
    parts = ["python", script]
    first = [k for k in ("model_path", "out_dir") if k in settings]
    for key, value in [(k, settings[k]) for k in first] + [(k, v) for k, v in settings.items() if k not in first]:
        if key == "model" or key not in defaults:
            continue
        if _plain(value) == _plain(defaults[key]):
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        parts += [f"--{key}", shlex.quote(str(value))]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------- seeds


def sample_seeds(seed, index):
    """(noise seed, label seed, row seed) of sample ``index``: functions of (seed, index) only."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(3, dtype=np.uint64)
    return int(state[0]), int(state[1]), int(state[2]) & (2**63 - 1)


def sample_labels(seed, indices, num_classes=NUM_CLASSES):
    """Class labels of samples ``indices``: uniform over ``num_classes``, each from (seed, i) only."""
    return np.array([np.random.default_rng(sample_seeds(seed, i)[1]).integers(num_classes) for i in indices],
                    dtype=np.int64)


# ------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass
class RunPlan:
    """What a run in ``out_dir`` still has to do (decided by rank 0, the same on every rank)."""

    settings: dict
    identity: dict
    device: str
    num_shards: int
    remaining: list
    done_images: int
    complete: bool
    notes: list = dataclasses.field(default_factory=list)  # what preparing did (logged by execute)

    @property
    def out_dir(self):
        return self.settings["out_dir"]

    @property
    def final_path(self):
        s = self.settings
        return os.path.join(self.out_dir, sample_io.samples_filename(s["num_samples"], s["image_size"],
                                                                      s["image_size"]))

    def shard_path(self, k):
        return os.path.join(self.out_dir, SHARD_DIR, sample_io.shard_filename(k))

    def shard_bounds(self, k):
        size = self.settings["shard_size"]
        return k * size, min((k + 1) * size, self.settings["num_samples"])


def resolve_device(settings):
    name = settings["device"]
    if not name:
        return dist_util.dev()
    device = th.device(name)
    if device.type == "cuda":
        if not th.cuda.is_available():
            raise SampleConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            local = dist_util.dev()
            return local if local.type == "cuda" else th.device("cuda", 0)
    return device


def _checkpoint_hint(path):
    base = os.path.basename(path)
    for name, entry in model_configs(MODEL_CONFIG_DIR).items():
        if entry.get("file") == base:
            return (f"It is the official {name} checkpoint: download it with `make download-models "
                    f"MODELS={name}` (into {DEFAULT_MODEL_DIR}/), or point the flag at your copy.")
    return (f"Download the official checkpoints with `make download-models` (into {DEFAULT_MODEL_DIR}/, "
            "see configs/models/), or check the path.")


def check_checkpoint_path(path, flag):
    if "://" in path and not path.startswith("file://"):
        return  # a URL: read (and checked) when loaded
    local = path[len("file://"):] if path.startswith("file://") else path
    if not os.path.exists(local):
        raise SampleConfigError(f"checkpoint not found: {path} (--{flag}). {_checkpoint_hint(local)}")
    if os.path.isdir(local):
        raise SampleConfigError(f"--{flag} {path} is a directory, not a checkpoint file")


def _shard_problem(path, plan, k):
    start, end = plan.shard_bounds(k)
    size = plan.settings["image_size"]
    try:
        shape, dtype = sample_io.npz_header(path, "arr_0")
    except Exception as e:  # a damaged zip shows up as several exception types
        return f"unreadable ({type(e).__name__}: {e})"
    if dtype != np.uint8 or shape != (end - start, size, size, 3):
        return f"arr_0 is {dtype} {shape}, expected uint8 {(end - start, size, size, 3)}"
    return None


def _remove_outputs(out_dir):
    """Delete the samples and records of the run in ``out_dir`` (used by --overwrite only)."""
    removed = []
    for name in OUTPUT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
            removed.append(name)
    for name in os.listdir(out_dir):
        if name.startswith("samples_") and name.endswith(".npz"):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    for name in (SHARD_DIR, PROGRESS_DIR, FAILED_DIR):
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name + "/")
    return removed


def _existing_samples(out_dir):
    names = [n for n in os.listdir(out_dir) if n.startswith("samples_") and n.endswith(".npz")]
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    if os.path.isdir(shard_dir):
        names += [f"{SHARD_DIR}/{n}" for n in os.listdir(shard_dir) if sample_io.shard_index(n) is not None]
    return sorted(names)


def _prepare_rank0(settings, device_type):
    for key in ("model_path", "classifier_path"):
        if settings[key]:
            check_checkpoint_path(settings[key], key)
    out_dir = settings["out_dir"]
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SampleConfigError(f"out_dir {out_dir} is not a writable directory: "
                                f"{e.strerror or e}") from None
    ident = identity(settings, device_type)
    config_path = os.path.join(out_dir, "config.yaml")
    notes = []
    if os.path.exists(config_path):
        recorded = read_yaml_mapping(config_path, what="run record").get("settings") or {}
        diffs = config_differences(recorded, ident, device_type)
        if diffs:
            if not settings["overwrite"]:
                raise SampleConfigError(
                    f"{out_dir} holds a run with a different configuration:\n  " + "\n  ".join(diffs)
                    + "\nUse another --out_dir, or --overwrite to delete that run's samples and start afresh.")
            notes.append(f"--overwrite: removed {', '.join(_remove_outputs(out_dir))} of a run with other "
                         f"settings ({'; '.join(diffs)})")
    else:
        existing = _existing_samples(out_dir)
        if existing:
            if not settings["overwrite"]:
                raise SampleConfigError(
                    f"{out_dir} holds samples ({', '.join(existing[:3])}{', ...' if len(existing) > 3 else ''}) "
                    "but no config.yaml, so it cannot be resumed safely; use another --out_dir, or "
                    "--overwrite to delete them")
            notes.append(f"--overwrite: removed {', '.join(_remove_outputs(out_dir))} (no config.yaml)")

    shard_dir = os.path.join(out_dir, SHARD_DIR)
    for directory in (out_dir, shard_dir):
        for name in os.listdir(directory) if os.path.isdir(directory) else []:
            if sample_io.is_tmp_file(name):  # left by a killed process: an unfinished shard
                os.remove(os.path.join(directory, name))
    for name in (PROGRESS_DIR, FAILED_DIR):  # the previous session's
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)

    num_shards = math.ceil(settings["num_samples"] / settings["shard_size"])
    plan = RunPlan(settings, ident, device_type, num_shards, [], 0, False)
    if os.path.exists(plan.final_path):
        plan.complete, plan.done_images = True, settings["num_samples"]
        return plan, notes
    for k in range(num_shards):
        path = plan.shard_path(k)
        if os.path.exists(path):
            problem = _shard_problem(path, plan, k)
            if problem:
                raise SampleConfigError(f"{path} is not a shard of this run: {problem}; delete it to have it "
                                        "sampled again")
            start, end = plan.shard_bounds(k)
            plan.done_images += end - start
        else:
            plan.remaining.append(k)
    return plan, notes


def prepare(settings, device=None):
    """Check the checkpoints' presence and ``out_dir``, and plan the work (collective).

    Rank 0 decides; every rank gets the plan, or raises the same :class:`SampleConfigError`.
    """
    dist_util.setup_dist()
    device = device or resolve_device(settings)
    result = None
    if dist_util.get_world_size() == 1:
        result = ("ok",) + _prepare_rank0(settings, device.type)
    elif dist_util.get_rank() == 0:
        try:
            result = ("ok",) + _prepare_rank0(settings, device.type)
        except SampleConfigError as e:
            result = ("error", str(e))
        except Exception as e:  # tell the other ranks instead of leaving them waiting
            result = ("error", f"{type(e).__name__}: {e}")
    result = dist_util.broadcast_object(result)
    if result[0] == "error":
        raise SampleConfigError(result[1])
    plan = result[1]
    plan.notes = list(result[2])
    plan.settings = settings  # this rank's own copy (identical)
    return plan


# ------------------------------------------------------------------------------------------ models


@dataclasses.dataclass
class Models:
    model: th.nn.Module
    classifier: th.nn.Module = None


def _call_with(fn, settings):
    names = inspect.signature(fn).parameters
    return fn(**{k: settings[k] for k in names if k in settings})


def _load_network(build, path, flag, device, use_fp16):
    net = build()
    try:
        state = dist_util.load_state_dict(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise SampleConfigError(f"cannot load --{flag} {path}: {e}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SampleConfigError(f"--{flag} {path} does not hold a state dict")
    check_state_dict(net, state, source=f"--{flag} {path}")
    net.load_state_dict(state, strict=True)
    net.to(device)
    if use_fp16:
        net.convert_to_fp16()
    net.eval()
    net.requires_grad_(False)
    return net


def _model_key(settings, names, path_key, device):
    return json.dumps({"path": settings[path_key], "device": str(device),
                       "flags": {k: settings[k] for k in names if k in settings}}, sort_keys=True, default=str)


def load_models(settings, device, cache=None):
    """The diffusion model (and classifier) of ``settings`` on ``device``; ``cache`` reuses loaded ones.

    Model flags that do not fit the checkpoint raise :class:`CheckpointError` naming the flag.
    """
    cache = {} if cache is None else cache
    names = list(inspect.signature(create_model).parameters)
    key = _model_key(settings, names, "model_path", device)
    if key not in cache:
        cache[key] = _load_network(lambda: _call_with(create_model, settings), settings["model_path"],
                                   "model_path", device, settings["use_fp16"])
    models = Models(cache[key])
    if settings["classifier_path"]:
        names = list(inspect.signature(create_classifier).parameters)
        key = _model_key(settings, names, "classifier_path", device)
        if key not in cache:
            cache[key] = _load_network(lambda: _call_with(create_classifier, settings),
                                       settings["classifier_path"], "classifier_path", device,
                                       settings["classifier_use_fp16"])
        models.classifier = cache[key]
    return models


def build_diffusion(settings):
    return create_gaussian_diffusion(
        steps=settings["diffusion_steps"],
        learn_sigma=settings["learn_sigma"],
        noise_schedule=settings["noise_schedule"],
        use_kl=settings["use_kl"],
        predict_xstart=settings["predict_xstart"],
        rescale_timesteps=settings["rescale_timesteps"],
        rescale_learned_sigmas=settings["rescale_learned_sigmas"],
        timestep_respacing=settings["timestep_respacing"],
    )


# ----------------------------------------------------------------------------------------- sampling


def _format_indices(indices, limit=20):
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > limit else "")


class Sampler:
    """Draws samples by index: ``sample([i, j, ...]) -> (uint8 NHWC images, int64 labels or None)``.

    ``model_wrapper(fn) -> fn`` wraps the guided model function (tests inject faults with it).
    """

    def __init__(self, settings, models, device, model_wrapper=None):
        self.settings = settings
        self.device = device
        if device.type == "cpu":
            dist_util.tune_cpu_allocator()  # large activations would page-fault in at every step
        self.diffusion = build_diffusion(settings)
        config = pag.GuidanceConfig.from_dict({k: settings[k] for k in guidance_keys()})
        try:
            guided = pag.guide(models.model, config, diffusion=self.diffusion)
        except ValueError as e:
            raise SampleConfigError(f"guidance settings: {e}") from None
        class_cond = settings["class_cond"]

        def model_fn(x, t, y=None, **kwargs):
            # An unconditional network gets no labels (they are there for the classifier).
            return guided(x, t, y=y, **kwargs) if class_cond else guided(x, t, **kwargs)

        self.model_fn = model_wrapper(model_fn) if model_wrapper else model_fn
        self.cond_fn = None
        if models.classifier is not None:
            self.cond_fn = pag.classifier_cond_fn(models.classifier, settings["classifier_scale"])
        self.with_labels = bool(class_cond or models.classifier is not None)

    def sample(self, indices):
        s, device = self.settings, self.device
        seeds = [sample_seeds(s["seed"], i) for i in indices]
        generators = [th.Generator(device=device).manual_seed(noise_seed) for noise_seed, _, _ in seeds]
        batch = len(indices)

        def randn_like(x):  # row j's noise comes from sample indices[j]'s generator, in draw order
            if x.shape[0] != batch:
                raise RuntimeError(f"noise requested for {x.shape[0]} rows, the batch has {batch}")
            noise = [th.randn(tuple(x.shape[1:]), generator=g, device=device) for g in generators]
            return th.stack(noise).to(x.dtype)

        model_kwargs = {"row_seeds": th.tensor([r for _, _, r in seeds], dtype=th.int64, device=device)}
        labels = None
        if self.with_labels:
            labels = sample_labels(s["seed"], indices, s["num_classes"])
            model_kwargs["y"] = th.from_numpy(labels).to(device)
        loop = self.diffusion.ddim_sample_loop_progressive if s["use_ddim"] else \
            self.diffusion.p_sample_loop_progressive
        steps = self.diffusion.num_timesteps
        timestep_map = getattr(self.diffusion, "timestep_map", list(range(steps)))
        sample = None
        for step, out in enumerate(loop(self.model_fn, (batch, 3, s["image_size"], s["image_size"]),
                                        clip_denoised=s["clip_denoised"], cond_fn=self.cond_fn,
                                        model_kwargs=model_kwargs, device=device, randn_like=randn_like)):
            sample = out["sample"]
            finite = th.isfinite(sample).flatten(1).all(dim=1)
            if not bool(finite.all()):
                bad = [indices[j] for j in (~finite).nonzero().flatten().tolist()]
                raise NonFiniteError(
                    f"non-finite values in sample(s) {_format_indices(bad)} at step {step + 1} of {steps} "
                    f"(timestep {timestep_map[steps - 1 - step]}); the run stopped, finished shards in "
                    f"{os.path.join(s['out_dir'], SHARD_DIR)} are intact")
        return sample_io.to_uint8_nhwc(sample), labels


class _Progress:
    """Rank 0's tqdm bar over all ranks' images; each rank reports its count in a small file."""

    def __init__(self, plan, rank):
        self.dir = os.path.join(plan.out_dir, PROGRESS_DIR)
        self.rank = rank
        self.mine = 0
        self.bar = None
        if rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=plan.settings["num_samples"], initial=plan.done_images, unit="img",
                            desc=os.path.basename(os.path.normpath(plan.out_dir)), dynamic_ncols=True,
                            smoothing=0.05, file=sys.stderr)
            self.start = plan.done_images

    def advance(self, n):
        self.mine += n
        try:
            path = os.path.join(self.dir, f"rank{self.rank}.txt")
            tmp = f"{path}.{os.getpid()}.part"
            with open(tmp, "w") as f:
                f.write(str(self.mine))
            os.replace(tmp, path)
        except OSError:
            pass  # progress display only
        self.refresh()

    def refresh(self):
        if self.bar is None:
            return
        total = 0
        try:
            for name in os.listdir(self.dir):
                if name.startswith("rank") and name.endswith(".txt"):
                    try:
                        with open(os.path.join(self.dir, name)) as f:
                            total += int(f.read().strip() or 0)
                    except (OSError, ValueError):
                        pass
        except OSError:
            return
        done = self.start + total
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.refresh()
            self.bar.close()


def _mark_failed(plan, rank, error):
    try:
        path = os.path.join(plan.out_dir, FAILED_DIR, f"rank{rank}.txt")
        sample_io.atomic_write_text(path, f"{type(error).__name__}: {error}")
    except OSError:
        pass


def _raise_if_peer_failed(plan):
    directory = os.path.join(plan.out_dir, FAILED_DIR)
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return
    for name in names:
        if name.startswith("rank") and name.endswith(".txt") and name != f"rank{dist_util.get_rank()}.txt":
            with open(os.path.join(directory, name)) as f:
                message = f.read()
            raise PeerFailedError(f"{name[:-4].replace('rank', 'rank ')} failed: {message}")


def _wait_until(predicate, plan, progress, what):
    """Poll the file system (not a collective: no timeout however uneven the ranks are)."""
    last_note = time.time()
    while not predicate():
        _raise_if_peer_failed(plan)
        progress.refresh()
        if time.time() - last_note > 600:
            logger.log(f"still waiting for {what()}")
            last_note = time.time()
        time.sleep(POLL_SECONDS)


def provenance():
    try:
        version = importlib.metadata.version("pag-adm")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "package": "pag-adm",
        "version": version,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": str(th.__version__),
        "numpy": str(np.__version__),
        "host": socket.gethostname(),
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def git_commit():
    """HEAD of the code's repository (+"-dirty" with uncommitted changes), or "unknown"."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True,  # noqa: E731
                                           text=True, timeout=30, check=True).stdout.strip()
        commit = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_record(plan, device):
    path = os.path.join(plan.out_dir, "config.yaml")
    if os.path.exists(path):
        return
    runtime = {k: plan.settings[k] for k in ("batch_size", "keep_shards", "model")}
    runtime.update(device=str(device), world_size=dist_util.get_world_size(), launcher=dist_util.launcher())
    if device.type == "cuda":
        runtime["gpu"] = th.cuda.get_device_name(device)
    doc = {"settings": plan.identity, "runtime": runtime, "provenance": provenance()}
    text = ("# Sampling run record (guided_diffusion/sample_run.py). `settings` identify the run: the same\n"
            "# out_dir is resumed only with the same settings. `runtime` is that of the first session.\n")
    sample_io.atomic_write_text(path, text + yaml.safe_dump(_plain(doc), sort_keys=True))


def _finish(plan, with_labels):
    """Rank 0: merge the shards, draw the grid, remove the shards."""
    s = plan.settings
    shards = [plan.shard_path(k) for k in range(plan.num_shards)]
    if not os.path.exists(plan.final_path):
        t0 = time.time()
        shape = sample_io.merge_shards(shards, plan.final_path, with_labels)
        logger.log(f"merged {plan.num_shards} shards into {plan.final_path} {shape} in {time.time() - t0:.1f}s")
    grid = os.path.join(plan.out_dir, "grid.png")
    if not os.path.exists(grid):
        sample_io.save_grid(_first_rows(plan.final_path, 64), grid)
    if not s["keep_shards"]:
        for path in shards:
            if os.path.exists(path):
                os.remove(path)
        try:
            os.rmdir(os.path.join(plan.out_dir, SHARD_DIR))
        except OSError:
            pass


def _first_rows(npz_path, n):
    """The first ``n`` rows of a (stored) npz's arr_0 without reading the rest."""
    import zipfile

    from numpy.lib import format as npy_format

    with zipfile.ZipFile(npz_path) as zf, zf.open("arr_0.npy") as f:
        version = npy_format.read_magic(f)
        reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _, dtype = reader(f)
        rows = min(n, shape[0])
        data = f.read(rows * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize)
    return np.frombuffer(data, dtype=dtype).reshape((rows,) + tuple(shape[1:]))


def execute(plan, sampler):
    """Sample this rank's share of the unfinished shards, then merge (collective). Returns the npz path.

    ``sampler`` may be None for a complete plan.
    """
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    s = plan.settings
    for note in plan.notes if rank == 0 else []:
        logger.log(note)
    if plan.complete:
        if rank == 0:
            logger.log(f"{plan.final_path} exists: the run is complete")
            _finish(plan, with_labels=None)
        dist_util.barrier()
        return plan.final_path
    if rank == 0:
        write_run_record(plan, sampler.device)

    mine = plan.remaining[rank::world]
    if rank == 0:
        logger.log(f"{s['num_samples']} samples in {plan.num_shards} shards of {s['shard_size']}: "
                   f"{plan.done_images} done, {len(plan.remaining)} shards to sample on {world} process(es); "
                   f"device {sampler.device}, batch size {s['batch_size']}")
    for name in (SHARD_DIR, PROGRESS_DIR, FAILED_DIR):
        os.makedirs(os.path.join(plan.out_dir, name), exist_ok=True)
    progress = _Progress(plan, rank)
    kill_after = int(os.environ.get(KILL_AFTER_SHARDS_ENV, "0") or 0)
    try:
        for count, k in enumerate(mine, 1):
            start, end = plan.shard_bounds(k)
            t0 = time.time()
            labels = []
            with sample_io.NpzWriter(plan.shard_path(k)) as writer:
                with writer.stream("arr_0", (end - start, s["image_size"], s["image_size"], 3), np.uint8) as out:
                    for b in range(start, end, s["batch_size"]):
                        images, batch_labels = sampler.sample(list(range(b, min(b + s["batch_size"], end))))
                        out.write(images)
                        labels.append(batch_labels)
                        progress.advance(len(images))
                if sampler.with_labels:
                    writer.write("arr_1", np.concatenate(labels))
                writer.write("sample_range", np.array([start, end], dtype=np.int64))
            seconds = time.time() - t0
            logger.log(f"shard {k + 1}/{plan.num_shards} (samples {start}-{end - 1}) done by rank {rank} in "
                       f"{seconds:.1f}s ({(end - start) / max(seconds, 1e-9):.2f} img/s)")
            if kill_after and count >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        shards = [plan.shard_path(k) for k in range(plan.num_shards)]
        if rank == 0:
            _wait_until(lambda: all(os.path.exists(p) for p in shards), plan, progress,
                        lambda: "shards " + ", ".join(os.path.basename(p) for p in shards if not os.path.exists(p)))
            progress.close()
            _finish(plan, sampler.with_labels)
        else:
            _wait_until(lambda: os.path.exists(plan.final_path), plan, progress,
                        lambda: f"rank 0 to write {plan.final_path}")
    except BaseException as e:
        if not isinstance(e, PeerFailedError):
            _mark_failed(plan, rank, e)
        raise
    dist_util.barrier()
    if rank == 0:
        for name in (PROGRESS_DIR, FAILED_DIR):
            shutil.rmtree(os.path.join(plan.out_dir, name), ignore_errors=True)
        logger.log(f"done: {plan.final_path}")
    return plan.final_path


def configure_logging(out_dir):
    logger.configure(dir=out_dir, format_strs=["stdout", "log"], all_ranks=True)


def run(settings, model_cache=None, model_wrapper=None):
    """Sample ``settings`` (from :func:`resolve_settings`) to completion; returns the npz path."""
    dist_util.setup_dist()
    device = resolve_device(settings)
    plan = prepare(settings, device)
    configure_logging(plan.out_dir)
    sampler = None
    if not plan.complete:
        if dist_util.get_rank() == 0:
            logger.log(f"loading {settings['model_path']}" + (
                f" and {settings['classifier_path']}" if settings["classifier_path"] else ""))
        models = load_models(settings, device, model_cache)
        sampler = Sampler(settings, models, device, model_wrapper=model_wrapper)
    return execute(plan, sampler)


def report_error(error, everywhere):
    """Print ``error`` once (rank 0) for errors every rank raised alike, else on this rank."""
    if everywhere and dist_util.get_rank() != 0:
        return
    prefix = f"[rank {dist_util.get_rank()}] " if dist_util.get_world_size() > 1 and not everywhere else ""
    print(f"{prefix}error: {error}", file=sys.stderr, flush=True)


def main(argv=None):
    """``scripts/image_sample.py``. Exit status 0 done, 2 bad input (nothing sampled), 1 failed run."""
    dist_util.setup_dist()
    try:
        settings = resolve_cli(argv)
        run(settings)
    except (SampleConfigError, CheckpointError) as e:
        report_error(e, everywhere=True)
        return 2
    except (NonFiniteError, PeerFailedError) as e:
        report_error(e, everywhere=False)
        return 1
    logger.reset()
    dist_util.cleanup_dist()
    return 0
