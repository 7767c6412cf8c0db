"""Naming perturbed layers: exact ``named_modules()`` names or glob patterns, checked against the model."""

import fnmatch

from guided_diffusion.unet import attention_block_info

# The paper's ADM 256x256 choice (16x16, 8x8, 8x8 and 8x8 blocks; 1024 channels, 16 heads).
PAPER_LAYERS_256 = ("input_blocks.14.1", "input_blocks.16.1", "input_blocks.17.1", "middle_block.1")


def split_layer_list(layers):
    """Accept a list of names or one comma-separated string; return a list of stripped names."""
    if isinstance(layers, str):
        layers = layers.split(",")
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"layers must be a list of block names or a comma-separated string, got {layers!r}")
    bad = [name for name in layers if not isinstance(name, str)]
    if bad:
        raise ValueError(f"layer names must be strings such as 'middle_block.1', got {bad[0]!r} in {list(layers)}")
    return [name.strip() for name in layers if name and name.strip()]


def format_attention_blocks(model):
    """A table of the model's attention blocks: name, resolution, channels, heads."""
    rows = attention_block_info(model)
    width = max([len("block")] + [len(name) for name, *_ in rows])
    lines = [f"{'block':<{width}}  resolution  channels  heads"]
    for name, resolution, channels, heads in rows:
        size = f"{resolution}x{resolution}"
        lines.append(f"{name:<{width}}  {size:>10}  {channels:>8}  {heads:>5}")
    return "\n".join(lines)


def resolve_layers(model, layers):
    """Resolve names and glob patterns to the model's attention blocks, in execution order.

    Raises a ValueError listing the valid blocks (with resolutions) when a name is unknown, names a
    module that is not an attention block, or a pattern matches nothing.
    """
    requested = split_layer_list(layers)
    info = attention_block_info(model)
    valid = [name for name, *_ in info]
    modules = dict(model.named_modules())
    chosen = set()
    for pattern in requested:
        if any(ch in pattern for ch in "*?["):
            matches = fnmatch.filter(valid, pattern)
            if not matches:
                raise ValueError(_invalid(model, f"pattern {pattern!r} matches no attention block"))
            chosen.update(matches)
        elif pattern in valid:
            chosen.add(pattern)
        elif pattern in modules:
            kind = type(modules[pattern]).__name__
            raise ValueError(_invalid(model, f"{pattern!r} is a {kind}, not an attention block"))
        else:
            raise ValueError(_invalid(model, f"this model has no module {pattern!r}"))
    if not chosen:
        raise ValueError(_invalid(model, "no layers given"))
    return [name for name in valid if name in chosen]


def _invalid(model, reason):
    return f"{reason}. The attention blocks of this model are:\n{format_attention_blocks(model)}"
