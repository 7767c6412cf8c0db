"""Gather evaluation results of many runs into tables (Markdown, CSV, LaTeX) and plots.

Each RUN is a run directory (the evaluator's JSON plus config.yaml), a result JSON, or a directory of run
directories. Runs named <cell>__seed-<s> (a sweep's seeds:) are one row, mean ± std over the seeds. See
evaluations/table.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adm_common.flags import FlagParser  # noqa: E402
from evaluations.table import DEFAULT_GROUP_BY, load_anchors, make_table  # noqa: E402


def main(argv=None):
    p = FlagParser(separator="-", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, result JSON files, or directories of runs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--group-by", default=",".join(DEFAULT_GROUP_BY),
                   help="comma-separated config keys identifying a row (default: %(default)s)")
    p.add_argument("--anchors", metavar="YAML", help="experiment YAML whose 'anchors:' list is printed beside ours")
    p.add_argument("--experiment", help="one table of this name for all runs")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--minimum", action="store_true",
                   help="for runs over seeds, also a column of the minimum FID over the seeds (EDM2's convention)")
    args = p.parse_args(argv)
    try:
        anchors = load_anchors(args.anchors) if args.anchors else None
        group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
        tables = make_table(args.runs, args.out, group_by=group_by, anchors=anchors, experiment=args.experiment,
                            plots=not args.no_plots, minimum=args.minimum)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, table in tables.items():
        with open(table["files"][0]) as f:
            print(f.read())
        print("wrote: " + ", ".join(table["files"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
