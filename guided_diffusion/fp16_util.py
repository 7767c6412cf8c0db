"""Conversion of the U-Net torso to float16, as upstream does for `use_fp16=True` checkpoints.

Only convolutions are converted; normalisation layers compute in float32 (GroupNorm32) and the timestep
embedding stays float32, so a model converted here matches upstream's numerics.
"""

import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module):
    """Convert a convolution's parameters to float16 (other modules are left alone)."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to_f32(module):
    """Undo :func:`convert_module_to_f16`."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
