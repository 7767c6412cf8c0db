"""Reading checkpoints (local paths and blobfile URLs) and loading them with errors in the user's terms.

A checkpoint that does not fit the model's flags is the most common way to lose an hour on a cluster;
:func:`load_checkpoint` says which flag is wrong (``class_cond``, ``num_channels``, ``learn_sigma``,
...) instead of printing torch's list of keys.
"""

import io
import os
import re

import torch as th

from . import dist_util


class CheckpointError(ValueError):
    """A checkpoint could not be read, or does not fit the model."""


class UnreadableCheckpoint(CheckpointError):
    """The bytes are not a PyTorch checkpoint at all (truncated, corrupt, or another kind of file)."""


def read_checkpoint(path, mmap=False):
    """The object saved at ``path`` (a local path or URL: gs://, az://, https://, file://), loaded onto the CPU with
    ``weights_only``: the project's one checkpoint reader. Under a process group rank 0 reads and broadcasts the bytes;
    ``mmap=True`` maps a local file for this process alone (no collective), each tensor read only when used."""
    source = os.fspath(path)
    try:
        data = None if mmap else dist_util.read_everywhere(path)
        size = os.path.getsize(source) if mmap else len(data)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (download the official checkpoints with `make download-models`)") from None
    try:
        return th.load(source if mmap else io.BytesIO(data), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types here (zip, pickle, EOF, weights-only errors)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnreadableCheckpoint(f"{source} ({size} bytes) is not a readable PyTorch checkpoint: it may be "
                                   "truncated (an interrupted download: fetch it again), not a checkpoint at all, "
                                   f"or hold objects other than tensors [{reason}]") from None


def read_state_dict(path, mmap=False):
    """The state dict (names to tensors) at ``path`` (see :func:`read_checkpoint`; a ``{"state_dict": ...}``
    wrapper is unwrapped), with a clear error if the file holds something else."""
    obj = read_checkpoint(path, mmap=mmap)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, th.Tensor) for v in obj.values()):
        raise CheckpointError(f"{os.fspath(path)} is not a state dict (a mapping of names to tensors)")
    return obj


def _index_set(names, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return {int(m.group(1)) for m in map(pattern.match, names) if m}


def _attention_names(names):
    return sorted({n.rsplit(".qkv.weight", 1)[0] for n in names if n.endswith(".qkv.weight")})


def diagnose_mismatch(model_shapes, ckpt_shapes):
    """Sentences (none when they fit) saying in flag terms why a checkpoint's {name: shape} differ from a model's."""
    hints = []
    model_names, ckpt_names = set(model_shapes), set(ckpt_shapes)

    if "label_emb.weight" in ckpt_names and "label_emb.weight" not in model_names:
        hints.append("the checkpoint is class-conditional (it has label_emb.weight) but the model was built with "
                     "class_cond=False: use class_cond=True")
    elif "label_emb.weight" in model_names and "label_emb.weight" not in ckpt_names:
        hints.append("the model was built with class_cond=True but the checkpoint has no label_emb.weight "
                     "(it is unconditional): use class_cond=False")

    key = "time_embed.0.weight"
    if key in model_shapes and key in ckpt_shapes and model_shapes[key] != ckpt_shapes[key]:
        hints.append(f"num_channels looks like {ckpt_shapes[key][1]} in the checkpoint, not {model_shapes[key][1]}")

    key = "out.2.weight"
    if key in model_shapes and key in ckpt_shapes and len(ckpt_shapes[key]) == 4:
        ckpt_out, model_out = ckpt_shapes[key][0], model_shapes[key][0]
        if ckpt_out != model_out and {ckpt_out, model_out} == {3, 6}:
            hints.append(f"the checkpoint predicts {ckpt_out} channels (learn_sigma={ckpt_out == 6}), "
                         f"the model {model_out}: use learn_sigma={ckpt_out == 6}")

    block_counts = {prefix: (len(_index_set(model_names, prefix)), len(_index_set(ckpt_names, prefix)))
                    for prefix in ("input_blocks", "output_blocks")}
    for prefix, (n_model, n_ckpt) in block_counts.items():
        if n_model != n_ckpt:
            hints.append(f"the checkpoint has {n_ckpt} {prefix}, the model {n_model}: check num_res_blocks, "
                         "channel_mult and image_size")

    attn_model, attn_ckpt = _attention_names(model_names), _attention_names(ckpt_names)
    inputs_model, inputs_ckpt = block_counts["input_blocks"]
    if attn_model != attn_ckpt and inputs_model == inputs_ckpt:
        hints.append(f"attention blocks differ ({len(attn_ckpt)} in the checkpoint, {len(attn_model)} in the "
                     "model): check attention_resolutions")

    scale_shift = [n for n in model_names & ckpt_names if n.endswith("emb_layers.1.weight")
                   and model_shapes[n] != ckpt_shapes[n]
                   and model_shapes[n][0] in (2 * ckpt_shapes[n][0], ckpt_shapes[n][0] // 2)]
    if scale_shift and not any("num_channels" in h for h in hints):
        ckpt_uses = ckpt_shapes[scale_shift[0]][0] > model_shapes[scale_shift[0]][0]
        hints.append(f"use_scale_shift_norm looks like {ckpt_uses} in the checkpoint")

    down_ops_ckpt = any(re.search(r"blocks\.\d+\.0\.op\.weight$", n) for n in ckpt_names)
    down_ops_model = any(re.search(r"blocks\.\d+\.0\.op\.weight$", n) for n in model_names)
    if down_ops_ckpt != down_ops_model:
        hints.append(f"resblock_updown looks like {not down_ops_ckpt} in the checkpoint")
    return hints


def mismatch_report(model_shapes, ckpt_shapes, source="the checkpoint"):
    """A message explaining how ``ckpt_shapes`` differ from ``model_shapes`` ({name: shape}), or None."""
    model_shapes = {k: tuple(v) for k, v in model_shapes.items()}
    ckpt_shapes = {k: tuple(v) for k, v in ckpt_shapes.items()}
    missing = sorted(set(model_shapes) - set(ckpt_shapes))
    unexpected = sorted(set(ckpt_shapes) - set(model_shapes))
    wrong_shape = sorted(k for k in set(model_shapes) & set(ckpt_shapes) if model_shapes[k] != ckpt_shapes[k])
    if not (missing or unexpected or wrong_shape):
        return None
    lines = [f"{source} does not fit the model built from these flags."]
    hints = diagnose_mismatch(model_shapes, ckpt_shapes)
    if hints:
        lines.append("Likely cause: " + "; ".join(hints) + ".")
    if missing:
        lines.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:4])}")
    if wrong_shape:
        shown = ", ".join(f"{k}: checkpoint {list(ckpt_shapes[k])} vs model {list(model_shapes[k])}"
                          for k in wrong_shape[:3])
        lines.append(f"{len(wrong_shape)} keys with other shapes, e.g. {shown}")
    return "\n".join(lines)


def check_state_dict(model, state_dict, source="the checkpoint"):
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's names and shapes."""
    report = mismatch_report({k: v.shape for k, v in model.state_dict().items()},
                             {k: v.shape for k, v in state_dict.items()}, source)
    if report:
        raise CheckpointError(report)


def load_checkpoint(model, source):
    """Load ``source`` (a path, a blobfile URL or a state dict) into ``model`` strictly; return the model."""
    if isinstance(source, dict):
        state_dict, name = source, "the state dict"
    else:
        state_dict, name = read_state_dict(source), os.fspath(source)
    check_state_dict(model, state_dict, name)
    model.load_state_dict(state_dict, strict=True)
    return model
