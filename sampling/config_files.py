"""Reading the project's YAML files (settings, sweeps, model configs, the reference list) with errors that
name the file and what it was meant to be. The one YAML reader of the run package and the scripts."""

import yaml


def read_yaml_mapping(path, what, error=ValueError):
    """The mapping in the YAML file ``path`` ({} for an empty file). Problems raise ``error`` naming ``what``
    the file is (``--config``, ``sweep config``, ``model config``, ...)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping")
    return data
