"""The run settings are declared once (sampling.settings.SETTINGS): the group dataclasses, the defaults, the flags
with their help, the checks and the table in docs/sampling.md all come from that table."""

import dataclasses
from pathlib import Path

import pytest

import pag
from sampling.cli import build_sample_parser
from sampling.settings import (
    GROUP_CLASSES,
    SETTINGS,
    SampleConfigError,
    Setting,
    build_settings,
    sample_defaults,
    settings_markdown,
)

ROOT = Path(__file__).resolve().parents[1]


def test_each_group_dataclass_has_exactly_the_table_entries_of_its_group_with_their_defaults():
    for group, cls in GROUP_CLASSES.items():
        names = [s.name for s in SETTINGS.values() if s.group == group]
        assert [f.name for f in dataclasses.fields(cls)] == names
        if group != "guidance":  # GuidanceConfig holds lists where the flags hold comma-separated strings
            assert dataclasses.asdict(cls()) == {name: SETTINGS[name].default for name in names}
    assert {name: SETTINGS[name].default for name in pag.guidance_defaults()} == pag.guidance_defaults()
    assert sample_defaults() == {name: s.default for name, s in SETTINGS.items()}


def test_every_flag_shows_the_help_and_default_of_its_table_entry():
    parser = build_sample_parser()
    flags = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    assert list(flags) == list(SETTINGS)
    for name, setting in SETTINGS.items():
        assert flags[name].help.startswith(setting.help)
        assert repr(setting.default) in flags[name].help or "(default:" in setting.help


def test_a_check_of_the_table_names_the_setting_and_what_it_must_be():
    values = dict(sample_defaults(), out_dir="-", model_path="-")
    with pytest.raises(SampleConfigError, match=r"^seed must be >= 0, got -3; shard_size must be positive, got 0$"):
        build_settings(dict(values, shard_size=0, seed=-3))
    lease = Setting("claim_lease", "runtime", 1.0, check=lambda v: v > 0, requirement="be positive")
    assert lease.problem(2.0) is None and lease.problem(-1.0) == "claim_lease must be positive, got -1.0"


def test_the_table_in_docs_sampling_is_the_settings_table():
    assert settings_markdown() in (ROOT / "docs" / "sampling.md").read_text()
    assert "| `num_samples` | `10000` |" in settings_markdown()
