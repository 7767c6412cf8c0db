"""The project's one YAML reader (settings, sweeps, model configs, the reference list, ``--set`` values), with
errors that name the file and what it was meant to be."""

import yaml


def parse_yaml(source, where, error=ValueError):
    """``source`` (text or an open file) as YAML; invalid YAML raises ``error`` naming ``where``, in one line."""
    try:
        return yaml.safe_load(source)
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML ({' '.join(str(e).split())})") from None


def read_yaml(path, what="YAML file", error=ValueError):
    """The mapping in the YAML file ``path`` ({} when empty); problems raise ``error`` naming ``what`` the file is."""
    try:
        with open(path) as f:
            data = parse_yaml(f, f"{what} {path}", error)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping")
    return data
