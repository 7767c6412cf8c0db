"""The official checkpoints' model configs (``sampling/configs/models/*.yaml``; the repository's ``configs/`` links
there): name, kind, url, file and upstream flags of each. The one reader of these files."""

import os
from pathlib import Path

from adm_common.yaml_files import read_yaml
from guided_diffusion.script_util import MODEL_KINDS

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = CONFIG_ROOT / "models"
DEFAULT_MODEL_DIR = Path("downloads") / "models"
REQUIRED_KEYS = ("name", "kind", "flags")


class ModelConfigError(ValueError):
    """A model config that does not exist or cannot be used."""


def load_model_config(name_or_path, config_dir=CONFIG_DIR, required=REQUIRED_KEYS):
    """Read a model config by checkpoint name (``256x256_diffusion_uncond``) or by YAML path, checked:
    the ``required`` keys (the downloader's add url, file, and its name must be the YAML's), a known kind, flags a
    mapping."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ModelConfigError(f"no model config {str(name_or_path)!r} (known: "
                               f"{', '.join(sorted(p.stem for p in Path(config_dir).glob('*.yaml')))}; "
                               "or give the path of a model config .yaml)")
    config = read_yaml(path, "model config", ModelConfigError)
    check_entry(config, f"{path}: model config", required)
    if "url" in required and config["name"] != path.stem:  # the downloader's: a user's copy may have any name
        raise ModelConfigError(f"{path}: name {config['name']!r} differs from the file name {path.stem!r}")
    if config["kind"] not in MODEL_KINDS:
        raise ModelConfigError(f"{path}: kind {config['kind']!r} is not one of {', '.join(MODEL_KINDS)}")
    if not isinstance(config["flags"], dict):
        raise ModelConfigError(f"{path}: 'flags' must be a mapping of upstream flag names to values")
    return config


def check_entry(entry, where, required=("url", "file"), error=ModelConfigError):
    """A mapping with the ``required`` keys, whose ``url`` and ``file`` (where present) are non-empty strings,
    ``file`` a bare file name: a model config, or an entry of configs/refs.yaml (the downloader's)."""
    if not isinstance(entry, dict):
        raise error(f"{where}: expected a mapping, got {type(entry).__name__}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise error(f"{where} lacks {', '.join(repr(k) for k in missing)}")
    for key in ("url", "file"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise error(f"{where}: {key!r} must be a non-empty string")
    if os.path.basename(entry.get("file", "")) != entry.get("file", ""):
        raise error(f"{where}: 'file' must be a bare file name, got {entry['file']!r}")


def model_configs(config_dir=CONFIG_DIR):
    """{name: config} of every ``*.yaml`` in ``config_dir`` (unreadable files are skipped)."""
    configs = {}
    for path in sorted(Path(config_dir).glob("*.yaml")):
        try:
            entry = load_model_config(path)
        except ModelConfigError:
            continue
        configs[entry["name"]] = entry
    return configs
