"""Peak activation memory of a PAG step at the real ADM-256 widths, counted on torch's meta device (no GPU, no
memory): unguided at B and 2B, the engine batched and sequential, the authors' two passes.

    python scripts/bench_memory.py [--batch_sizes 8,32,64] [--dtype float16] [--arch 256x256_diffusion_uncond]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from adm_common.flags import FlagParser  # noqa: E402
from benchmarks.memory import memory_table, to_markdown  # noqa: E402


def main(argv=None):
    p = FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_sizes", default="8,32,64", help="comma-separated batch sizes B")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--arch", default="256x256_diffusion_uncond")
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    print(to_markdown(memory_table(batches, dtype=getattr(torch, args.dtype), arch=args.arch)))


if __name__ == "__main__":
    main()
