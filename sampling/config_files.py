"""The run package's name for the one YAML reader (``adm_common.yaml_files``)."""

from adm_common.yaml_files import read_yaml as read_yaml_mapping  # noqa: F401
