"""Peak activation memory of one guided model call at the real ADM-256 widths, counted on torch's meta device (no GPU,
no memory): unguided at B and 2B, the engine batched and sequential, the authors' two passes. What is counted is
live storage bytes (on real CPU tensors too); that cannot see kernel workspaces
(flash attention's, cuDNN's) or the CUDA allocator's rounding, and meta's math attention keeps the (T x T) map that
flash attention does not (docs/gpu.md).
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import pag
from adm_common.flags import FlagParser
from evaluations.table import markdown_table
from sampling.models import set_compute_dtype

from .models import ARCHS, build, diffusion_flags, step_inputs
from .timing import guided_variants


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive (``live``) and their maximum
    (``peak``), sampled after every operation. Storages that existed before (weights, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known = set()  # ids of counted storages (a storage's Python object lives as long as the storage)

    def _forget(self, key, nbytes):
        self._known.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._known or storage.nbytes() == 0:
                continue
            self._known.add(key)
            self.live += storage.nbytes()
            weakref.finalize(storage, self._forget, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def peak_bytes(fn):
    """Peak live bytes of what ``fn()`` allocates (under ``torch.no_grad``, as sampling runs)."""
    with torch.no_grad(), LiveBytes() as mode:
        fn()
    return mode.peak


def memory_table(batch_sizes=(8, 32, 64), device="meta", dtype=torch.float16, arch=ARCHS[0], num_channels=None):
    """Rows of peak activation GiB per variant and batch size for ``arch`` (the real widths unless
    ``num_channels``), the torso in ``dtype`` (float16: upstream's use_fp16 conversion), at ``step_inputs``."""
    flags = diffusion_flags(arch, tiny=False, num_channels=num_channels)
    model, _, _ = build("diffusion", flags, device, seed=0)
    model = set_compute_dtype(model, dtype)
    layers = pag.resolve_layers(model, pag.PAPER_LAYERS_256)
    rows = []
    for batch in batch_sizes:
        variants = guided_variants(model, layers, *step_inputs(flags, batch, device), doubled=True)
        peaks = {name: peak_bytes(fn) / 2**30 for name, fn in variants.items()}
        rows.append(dict(batch=batch, **peaks, engine_vs_unguided_2b=peaks["engine"] / peaks["unguided_2b"]))
    return {"arch": arch, "dtype": str(dtype).replace("torch.", ""), "device": str(device), "layers": layers,
            "rows": rows}


def to_markdown(table):
    title = (f"Peak activation memory of one model call, GiB ({table['arch']}, {table['dtype']} torso, "
             f"PAG at {', '.join(table['layers'])}; counted on `{table['device']}` by benchmarks/memory.py):")
    return "\n".join([title, ""] + markdown_table(
        ["batch B", "unguided (B)", "unguided (2B)", "engine, batched", "engine, sequential", "two passes",
         "engine / unguided (2B)"],
        [[r["batch"]] + [f"{r[k]:.1f}" for k in ("unguided", "unguided_2b", "engine", "engine_sequential", "two_pass")]
         + [f"{r['engine_vs_unguided_2b']:.3f}"] for r in table["rows"]]))


def main(argv=None):
    p = FlagParser(description=__doc__)
    p.add_argument("--batch_sizes", default="8,32,64", help="comma-separated batch sizes B")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--arch", default=ARCHS[0])
    args = p.parse_args(argv)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    print(to_markdown(memory_table(batches, dtype=getattr(torch, args.dtype), arch=args.arch)))
    return 0
