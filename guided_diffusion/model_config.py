"""``configs/models/*.yaml``: one file per official checkpoint (name, kind, url, file, flags)."""

from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"


def load_model_config(name_or_path):
    """Read a model config by checkpoint name (``256x256_diffusion_uncond``) or by YAML path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"no model config {name_or_path!r} (known: {known})")
    config = yaml.safe_load(path.read_text())
    for key in ("name", "kind", "flags"):
        if key not in config:
            raise ValueError(f"{path}: model config lacks {key!r}")
    return config


def model_configs(config_dir=CONFIG_DIR):
    """{name: config} of every ``*.yaml`` in ``config_dir`` (unreadable files are skipped)."""
    configs = {}
    for path in sorted(Path(config_dir).glob("*.yaml")):
        try:
            entry = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(entry, dict) and entry.get("name"):
            configs[entry["name"]] = entry
    return configs
