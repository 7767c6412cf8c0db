"""Builders from upstream's flat flag dictionaries, with upstream's function and flag names.

Researchers' scripts written for openai/guided-diffusion call these with the same flags and get the same
architectures (and so load the official checkpoints).
"""

import argparse
import inspect

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000

# Upstream's default channel multipliers per resolution (used when `channel_mult` is "").
_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
_SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def diffusion_defaults():
    """Defaults for the diffusion process (image and classifier training share them)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults():
    """Defaults for the noisy-image classifier."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
    )


def model_and_diffusion_defaults():
    """Defaults for image models and their diffusion process."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
    )
    res.update(diffusion_defaults())
    return res


def classifier_and_diffusion_defaults():
    return dict(classifier_defaults(), **diffusion_defaults())


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
):
    flags = locals()
    return call_with(create_model, flags), diffusion_from(flags)


def _channel_mult(channel_mult, image_size, table):
    if channel_mult == "" or channel_mult is None:
        if image_size not in table:
            raise ValueError(
                f"no default channel_mult for image_size {image_size} (known: {sorted(table)}); "
                "pass channel_mult, e.g. '1,2,2'"
            )
        return table[image_size]
    if isinstance(channel_mult, str):
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


def _attention_ds(attention_resolutions, image_size):
    """Resolutions (e.g. "32,16,8") -> downsampling factors (e.g. (8, 16, 32) for 256x256)."""
    if isinstance(attention_resolutions, str):
        attention_resolutions = [r for r in attention_resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in attention_resolutions)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
):
    return _unet(UNetModel, locals(), _CHANNEL_MULT)


def _unet(cls, flags, channel_mults):
    """A U-Net of class ``cls`` from upstream's model flags (``channel_mults``: the default channel_mult per size)."""
    image_size = flags["image_size"]
    return cls(
        image_size=image_size,
        in_channels=3,
        model_channels=flags["num_channels"],
        out_channels=(6 if flags["learn_sigma"] else 3),
        num_res_blocks=flags["num_res_blocks"],
        attention_resolutions=_attention_ds(flags["attention_resolutions"], image_size),
        dropout=flags["dropout"],
        channel_mult=_channel_mult(flags["channel_mult"], image_size, channel_mults),
        num_classes=(NUM_CLASSES if flags["class_cond"] else None),
        use_new_attention_order=flags.get("use_new_attention_order", False),
        **{name: flags[name] for name in ("use_checkpoint", "use_fp16", "num_heads", "num_head_channels",
                                          "num_heads_upsample", "use_scale_shift_norm", "resblock_updown")},
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
):
    flags = locals()
    return call_with(create_classifier, flags), diffusion_from(flags)


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
):
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=NUM_CLASSES,
        num_res_blocks=classifier_depth,
        attention_resolutions=_attention_ds(classifier_attention_resolutions, image_size),
        channel_mult=_channel_mult("", image_size, _CHANNEL_MULT),
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults():
    return flags_of(sr_create_model_and_diffusion, dict(model_and_diffusion_defaults(), large_size=256, small_size=64))


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
):
    flags = locals()
    return call_with(sr_create_model, flags), diffusion_from(flags)


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
):
    # The architecture depends on the output size only; the channel multipliers are the size's default.
    return _unet(SuperResModel, dict(locals(), image_size=large_size, channel_mult=""), _SR_CHANNEL_MULT)


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
):
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def flags_of(fn, flags):
    """The entries of ``flags`` that builder ``fn`` takes (each builder takes the flags of its parameter names)."""
    return {name: flags[name] for name in inspect.signature(fn).parameters if name in flags}


def call_with(fn, flags):
    return fn(**flags_of(fn, flags))


def diffusion_from(flags):
    """The diffusion of a flag dictionary (a create_*_and_diffusion function's, or a run's)."""
    return call_with(create_gaussian_diffusion, dict(flags, steps=flags["diffusion_steps"]))


# kind -> (upstream's flag defaults, the builder of (model, diffusion) from those flags)
_KINDS = {
    "diffusion": (model_and_diffusion_defaults, create_model_and_diffusion),
    "upsampler": (sr_model_and_diffusion_defaults, sr_create_model_and_diffusion),
    "classifier": (classifier_and_diffusion_defaults, create_classifier_and_diffusion),
}
MODEL_KINDS = tuple(_KINDS)


def model_defaults(kind):
    """Upstream's flag defaults for a model kind: diffusion, upsampler or classifier."""
    if kind not in _KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
    return _KINDS[kind][0]()


def create_model_from_flags(kind, flags):
    """Build ``(model, diffusion)`` of ``kind`` from flags merged onto upstream's defaults.

    This is how a ``configs/models/*.yaml`` entry becomes a model. Unknown flags are an error.
    """
    defaults = model_defaults(kind)
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ValueError(
            f"flags {', '.join(unknown)} are not {kind} flags (known: {', '.join(sorted(defaults))})"
        )
    return _KINDS[kind][1](**{**defaults, **flags})


def add_dict_to_argparser(parser, default_dict):
    """Add one `--key` flag per entry; booleans accept yes/no/true/false/1/0."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args, keys):
    return {k: getattr(args, k) for k in keys}


def str2bool(v):
    """https://stackoverflow.com/questions/15008758/parsing-boolean-values-with-argparse"""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")
