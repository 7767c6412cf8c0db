"""One flag spelling per command family (README: underscores for sampling, sweeps, analysis, benchmarks, training
and the demo; hyphens for the evaluator, the tables and the downloads), the other accepted silently:
:class:`FlagParser` lists only its family's spelling; :func:`respell_flags` serves parsers built elsewhere."""

import argparse
import functools
import sys

SEPARATORS = ("_", "-")


def respell_flags(argv, separator):
    """``argv`` with every long flag's words joined by ``separator`` (``--num-samples=3`` -> ``--num_samples=3``
    for ``"_"``); values, short flags and everything after ``--`` are left as they are."""
    other = SEPARATORS[1 - SEPARATORS.index(separator)]
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            arg = "--" + name.replace(other, separator) + equals + value
        out.append(arg)
    return out


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags use ``separator``; the other spelling is accepted too (not listed in --help)."""

    def __init__(self, *args, separator="_", **kwargs):
        if separator not in SEPARATORS:  # fails here, not at the first parse
            raise ValueError(f"a flag separator is one of {SEPARATORS}, got {separator!r}")
        self.separator = separator
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(respell_flags(args, self.separator), namespace)

    def add_subparsers(self, **kwargs):
        # Sub-commands read the same spelling (argparse would build them with the default separator).
        kwargs.setdefault("parser_class", functools.partial(type(self), separator=self.separator))
        return super().add_subparsers(**kwargs)
