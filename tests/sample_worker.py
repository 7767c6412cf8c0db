"""``scripts/image_sample.py`` with test hooks, given before the sampling flags:

* ``--kill-after-shards K``: the process SIGKILLs itself (no clean-up runs) after writing its K-th shard;
* ``--stop-on-claim K``: the process SIGSTOPs itself when it claims its K-th shard (it then holds the claim and
  the run lock without a heartbeat), after writing its pid to ``--pid-file PATH``; with ``--stop-rank R`` only
  rank R does (the rank comes from the MPI launcher's environment).

Every other argument goes to ``sampling.cli.main``.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampling import cli  # noqa: E402

OPTIONS = ("--kill-after-shards", "--stop-on-claim", "--stop-rank", "--pid-file")


def main(argv):
    options = {}
    while argv[:1] and argv[0] in OPTIONS:
        options[argv[0]], argv = argv[1], argv[2:]
    kill_after = int(options.get("--kill-after-shards", 0))
    stop_on = int(options.get("--stop-on-claim", 0))
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    stop_here = stop_on and int(options.get("--stop-rank", rank)) == rank

    def on_shard_written(count):
        if kill_after and count >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_shard_claimed(count):
        if stop_here and count == stop_on:
            Path(options["--pid-file"]).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGSTOP)

    return cli.main(argv, on_shard_written=on_shard_written, on_shard_claimed=on_shard_claimed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
