"""One flag spelling per command family (adm_common.flags): every family's parser declares and lists in --help
only its spelling (underscores: sampling, sweeps, analysis, benchmarks, training, the demo; hyphens: evaluation,
tables, downloads) and reads the other spelling as the same flag."""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from adm_common.flags import FlagParser, respell_flags

ROOT = Path(__file__).resolve().parents[1]


def script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def other_spelling(argv, separator):
    other = "-" if separator == "_" else "_"
    return [a[:2] + a[2:].replace(separator, other) if a.startswith("--") else a for a in argv]


def sample_parser():
    from sampling.cli import build_sample_parser

    return build_sample_parser()


def sweep_parser():
    from sampling.cli import build_sweep_parser

    return build_sweep_parser()


def analysis_parser():
    from analysis.cli import build_parser

    return build_parser()


def evaluator_parser():
    from evaluations.evaluator import build_parser

    return build_parser()


# family: (parser builder, its separator, a command line in its spelling)
PARSERS = {
    "sampling": (sample_parser, "_", ["--num_samples", "7", "--out_dir", "x", "--use_ddim", "--pag_layers", "a,b"]),
    "sweep": (sweep_parser, "_", ["c.yaml", "--dry_run", "--out_dir", "x", "--set", "num_samples=2"]),
    "analysis": (analysis_parser, "_", ["--curve_samples", "3", "--shown_steps", "2", "--batch_size", "4"]),
    "evaluation": (evaluator_parser, "-", ["r.npz", "s.npz", "--batch-size", "8", "--no-cache", "--pr-precision",
                                           "float32", "--bootstrap-seed=3"]),
    "training": (lambda: script("image_train").create_argparser(), "_",
                 ["--lr_anneal_steps", "5", "--use_fp16", "True", "--num_res_blocks", "1"]),
}


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_both_spellings_give_the_same_values_and_help_lists_one(family):
    build, separator, argv = PARSERS[family]
    parser = build()
    other = "-" if separator == "_" else "_"
    flags = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    assert not [f for f in flags if other in f[2:]], "a flag in the other spelling"
    respelled = other_spelling(argv, separator)
    assert respelled != argv
    assert vars(parser.parse_args(respelled)) == vars(parser.parse_args(argv))
    text = parser.format_help()
    assert [a for a in argv if a.startswith("--") and a.split("=")[0] not in text] == []
    assert [a for a in respelled if a.startswith("--") and other in a[2:] and a.split("=")[0] in text] == []


def test_gpu_check_and_the_table_script(capsys):
    from benchmarks.gpu_check import parse_args

    assert parse_args(["--batch-sizes", "1,8", "--num-channels", "32"]) == parse_args(
        ["--batch_sizes", "1,8", "--num_channels", "32"])
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--batch_sizes" in capsys.readouterr().out
    make_table = script("make_table")
    # Parsed (the missing run is the table code's error, exit 2, not argparse's SystemExit).
    assert make_table.main(["missing-run", "--out", "x", "--group_by", "pag_scale", "--no_plots"]) == 2
    with pytest.raises(SystemExit):
        make_table.main(["--help"])
    out = capsys.readouterr().out
    assert "--group-by" in out and "--group_by" not in out


@pytest.mark.parametrize("module, argv, flag", [
    ("benchmarks.cost", ["--peak-fraction", "x"], "--peak_fraction"),
    ("benchmarks.bench_guidance", ["--num-channels", "x"], "--num_channels"),
])
def test_the_benchmarks_read_the_other_spelling_as_their_flag(module, argv, flag, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit):
        main(argv)
    assert f"argument {flag}: invalid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert flag in out and argv[0] not in out


def run(*command):
    return subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, flag", [
    (["scripts/demo.py", "finish", "--num-reference", "x"], "--num_reference"),
    (["scripts/train_demo.py", "--max-minutes", "x"], "--max_minutes"),
])
def test_the_demo_entry_points_respell_the_command_line(command, flag):
    """The flag in the other spelling reaches its parser: its bad value is refused under the flag's own name."""
    result = run(*command)
    assert result.returncode == 2 and f"argument {flag}: invalid" in result.stderr, result.stderr


def test_the_download_entry_point_respells_the_command_line():
    result = run("scripts/download.py", "list", "--no_verify")  # its flags use hyphens: --no-verify
    assert result.returncode == 0, result.stderr


def test_respelling_leaves_values_short_flags_and_what_follows_a_double_dash():
    assert respell_flags(["--num-samples=a-b", "x-y", "-n", "--", "--keep-me"], "_") == [
        "--num_samples=a-b", "x-y", "-n", "--", "--keep-me"]
    with pytest.raises(ValueError, match="a flag separator is one of"):
        FlagParser(separator=".")


def test_sub_commands_read_their_parents_spelling():
    parser = FlagParser(separator="-")
    sub = parser.add_subparsers(dest="group").add_parser("models")
    sub.add_argument("--no-verify", action="store_true")
    assert parser.parse_args(["models", "--no_verify"]).no_verify
