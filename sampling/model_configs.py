"""The official checkpoints' model configs, shipped with the package (``sampling/configs/models/*.yaml``;
``configs/`` in the repository links there): name, kind, url, file and upstream flags of each.

The one reader of these files: ``--model NAME``, ``scripts/download.py``, ``list_attention_blocks.py`` and
the benchmarks all come here.
"""

from pathlib import Path

from adm_common.yaml_files import read_yaml

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = CONFIG_ROOT / "models"
DEFAULT_MODEL_DIR = Path("downloads") / "models"
REQUIRED_KEYS = ("name", "kind", "flags")


class ModelConfigError(ValueError):
    """A model config that does not exist or cannot be used."""


def known_names(config_dir=CONFIG_DIR, kind=None):
    return sorted(name for name, entry in model_configs(config_dir).items() if kind is None or entry["kind"] == kind)


def load_model_config(name_or_path, config_dir=CONFIG_DIR):
    """Read a model config by checkpoint name (``256x256_diffusion_uncond``) or by YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(config_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ModelConfigError(f"no model config {str(name_or_path)!r} (known: "
                               f"{', '.join(sorted(p.stem for p in Path(config_dir).glob('*.yaml')))}; "
                               "or give the path of a model config .yaml)")
    config = read_yaml(path, "model config", ModelConfigError)
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ModelConfigError(f"{path}: model config lacks {', '.join(repr(k) for k in missing)}")
    return config


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
