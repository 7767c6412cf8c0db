"""Float16 helpers: converting the U-Net torso (as upstream does for `use_fp16=True` checkpoints) and
training it with float32 master weights and dynamic loss scaling (upstream's ``MixedPrecisionTrainer``).

Only convolutions are converted; normalisation layers compute in float32 (GroupNorm32) and the timestep
embedding stays float32, so a model converted here matches upstream's numerics.
"""

import math

import torch as th
import torch.nn as nn

from . import logger

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(l):  # noqa: E741 (upstream's parameter name)
    """Convert a convolution's parameters to float16 (other modules are left alone)."""
    for param in [p for p in (l.weight, l.bias) if p is not None] if isinstance(l, _CONVS) else ():
        param.data = param.data.half()


def convert_module_to_f32(l):  # noqa: E741 (upstream's parameter name)
    """Undo :func:`convert_module_to_f16`."""
    for param in [p for p in (l.weight, l.bias) if p is not None] if isinstance(l, _CONVS) else ():
        param.data = param.data.float()


# ----------------------------------------------------------------------------------------------
# Training with a float16 torso: float32 "master" copies of the parameters take the optimiser steps.
#
# The master copies are flat: one vector for the scalar/vector parameters (biases, norms) and one
# (1, -1) matrix for the rest, as upstream lays them out, so upstream's optimiser state dicts fit.

INITIAL_LOG_LOSS_SCALE = 20.0


def _flatten(tensors):
    if not tensors:
        return th.zeros(0)
    return th.cat([t.reshape(-1) for t in tensors])


def get_param_groups_and_shapes(named_model_params):
    """[(scalar/vector (name, param) pairs, -1), (matrix/conv (name, param) pairs, (1, -1))]."""
    named_model_params = list(named_model_params)
    vectors = [(name, p) for name, p in named_model_params if p.ndim <= 1]
    matrices = [(name, p) for name, p in named_model_params if p.ndim > 1]
    return [(vectors, (-1)), (matrices, (1, -1))]


def make_master_params(param_groups_and_shapes):
    """One float32 leaf parameter per group, holding the group's parameters flattened in order."""
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        flat = _flatten([p.detach().float() for _, p in param_group]).view(shape)
        master_params.append(nn.Parameter(flat.clone(), requires_grad=True))
    return master_params


def param_grad_or_zeros(param):
    """The parameter's gradient (detached), or zeros shaped like it when it has none."""
    if param.grad is None:
        return th.zeros_like(param)
    return param.grad.detach()


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Set each master parameter's gradient to its group's model gradients, flattened (float32)."""
    for master, (param_group, shape) in zip(master_params, param_groups_and_shapes):
        grads = [param_grad_or_zeros(p).float() for _, p in param_group]
        master.grad = _flatten(grads).to(master.device).view(shape)


def unflatten_master_params(param_group, master_param):
    """Views of a flat master vector shaped like the group's parameters."""
    sizes = [p.numel() for _, p in param_group]
    pieces = master_param.reshape(-1).split(sizes) if sizes else []
    return [piece.view(p.shape) for piece, (_, p) in zip(pieces, param_group)]


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the master values back into the (possibly float16) model parameters."""
    for master, (param_group, _) in zip(master_params, list(param_groups_and_shapes)):
        with th.no_grad():
            for (_, param), value in zip(param_group, unflatten_master_params(param_group, master)):
                param.copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """The model's state dict with its parameters taken from ``master_params`` (float32 with fp16)."""
    state_dict = model.state_dict()
    if use_fp16:
        named = [(name, value) for master, (group, _) in zip(master_params, param_groups_and_shapes)
                 for (name, _), value in zip(group, unflatten_master_params(group, master))]
    else:
        named = [(name, value) for (name, _), value in zip(model.named_parameters(), master_params)]
    for name, value in named:
        if name not in state_dict:
            raise KeyError(f"parameter {name} is not in the model's state dict")
        state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Master parameters (as :func:`make_master_params` lays them out with fp16) from a state dict."""
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params):
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """Zero the existing gradients in place (keeping their tensors, as upstream)."""
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def check_overflow(value):
    """Whether a (gradient norm) value is inf or NaN."""
    value = float(value)
    return math.isinf(value) or math.isnan(value)


class MixedPrecisionTrainer:
    """Backward and optimiser steps for a model, with dynamic loss scaling when ``use_fp16``.

    With fp16 the model's torso is converted to float16 and the optimiser must be built on
    :attr:`master_params` (float32); the loss is multiplied by ``2 ** lg_loss_scale`` before backward.
    A step whose gradients overflow is skipped and halves the scale; every taken step grows
    ``lg_loss_scale`` by ``fp16_scale_growth`` (upstream's schedule, which ``torch.amp.GradScaler``
    cannot express). Without fp16 the master parameters are the model's own.
    """

    def __init__(self, *, model, use_fp16=False, fp16_scale_growth=1e-3,
                 initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss: th.Tensor):
        if self.use_fp16:
            (loss * 2**self.lg_loss_scale).backward()
        else:
            loss.backward()

    def optimize(self, opt: th.optim.Optimizer):
        """Take the optimiser step; False when an fp16 overflow made it skip."""
        return self._optimize_fp16(opt) if self.use_fp16 else self._optimize_normal(opt)

    def _optimize_fp16(self, opt: th.optim.Optimizer):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        grad_norm, param_norm = self._compute_norms(grad_scale=2**self.lg_loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"Found NaN, decreased lg_loss_scale to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        for p in self.master_params:
            p.grad.mul_(1.0 / 2**self.lg_loss_scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def _optimize_normal(self, opt: th.optim.Optimizer):
        grad_norm, param_norm = self._compute_norms()
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)
        opt.step()
        return True

    def _compute_norms(self, grad_scale=1.0):
        """(gradient norm / grad_scale, parameter norm) over all master parameters, as floats."""
        def total_norm(tensors):
            if not tensors:
                return 0.0
            norms = th.stack([th.linalg.vector_norm(t.detach(), dtype=th.float32) for t in tensors])
            return th.linalg.vector_norm(norms.double()).item()

        grads = [p.grad for p in self.master_params if p.grad is not None]
        return total_norm(grads) / grad_scale, total_norm(self.master_params)

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)
