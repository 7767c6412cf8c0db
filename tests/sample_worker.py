"""``scripts/image_sample.py`` with a test hook: ``--kill-after-shards K`` makes the process SIGKILL itself (no
clean-up runs) after writing its K-th shard. Every other argument goes to ``sampling.cli.main``."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sampling import cli  # noqa: E402


def main(argv):
    kill_after = None
    if argv[:1] == ["--kill-after-shards"]:
        kill_after, argv = int(argv[1]), argv[2:]

    def on_shard_written(count):
        if kill_after and count >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    return cli.main(argv, on_shard_written=on_shard_written)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
