"""Print every attention block of a model (name, resolution, channels, heads) for choosing PAG layers.

    python scripts/list_attention_blocks.py 256x256_diffusion_uncond
    python scripts/list_attention_blocks.py configs/models/64x64_diffusion.yaml
    python scripts/list_attention_blocks.py --set image_size=32 --set num_channels=64 --set channel_mult=1,2,2

The model is built on the meta device: no weights, no memory, no checkpoint needed.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adm_common.flags import FlagParser  # noqa: E402
from sampling.cli import parse_overrides  # noqa: E402
from sampling.model_configs import load_model_config  # noqa: E402
from guided_diffusion.script_util import create_model_from_flags  # noqa: E402
from pag.layers import format_attention_blocks  # noqa: E402


def main(argv=None):
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="official checkpoint name or model config YAML")
    parser.add_argument("--kind", default="diffusion", help="with --set: diffusion, upsampler or classifier")
    parser.add_argument("--set", "--flag", dest="flags", action="append", default=[], metavar="KEY=VALUE",
                        help="model flag (repeatable, a YAML scalar as sweep.py's --set), applied over the config "
                        "or the upstream defaults")
    args = parser.parse_args(argv)
    if not (args.model or args.flags):
        parser.error("give a model name / config, or --set KEY=VALUE flags")
    try:
        config = load_model_config(args.model) if args.model else {"kind": args.kind, "flags": {}}
        with torch.device("meta"):
            model = create_model_from_flags(config["kind"], dict(config["flags"], **parse_overrides(args.flags)))[0]
    except ValueError as e:  # ModelConfigError, SampleConfigError (--set), flags the model refuses
        parser.error(str(e))
    print(format_attention_blocks(model))
    return 0

if __name__ == "__main__":
    sys.exit(main())
