"""Drop-in compatibility with upstream openai/guided-diffusion: its public names and signatures, the
attention submodules (hooks, patches, thop's counter), public attributes, and the inputs upstream runs."""

import importlib
import inspect
import math

import pytest
import torch

import pag
from guided_diffusion import script_util as su
from guided_diffusion.attention import AttentionOverride, identity_attention
from guided_diffusion.unet import (
    AttentionBlock,
    QKVAttention,
    QKVAttentionLegacy,
    attention_blocks,
    count_flops_attn,
)

# Upstream's public functions, classes and methods with their parameter lists, read from the source of
# openai/guided-diffusion (22e0df8). Annotations are left out; INFO and INITIAL_LOG_LOSS_SCALE are
# upstream's constants. A class listed with None only has to exist.
UPSTREAM = {
    "dist_util": {
        "setup_dist": "()",
        "dev": "()",
        "load_state_dict": "(path, **kwargs)",
        "sync_params": "(params)",
    },
    "fp16_util": {
        "convert_module_to_f16": "(l)",
        "convert_module_to_f32": "(l)",
        "make_master_params": "(param_groups_and_shapes)",
        "model_grads_to_master_grads": "(param_groups_and_shapes, master_params)",
        "master_params_to_model_params": "(param_groups_and_shapes, master_params)",
        "unflatten_master_params": "(param_group, master_param)",
        "get_param_groups_and_shapes": "(named_model_params)",
        "master_params_to_state_dict": "(model, param_groups_and_shapes, master_params, use_fp16)",
        "state_dict_to_master_params": "(model, state_dict, use_fp16)",
        "zero_master_grads": "(master_params)",
        "zero_grad": "(model_params)",
        "param_grad_or_zeros": "(param)",
        "check_overflow": "(value)",
        "MixedPrecisionTrainer.__init__": "(self, *, model, use_fp16=False, fp16_scale_growth=0.001, "
                                          "initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE)",
        "MixedPrecisionTrainer.zero_grad": "(self)",
        "MixedPrecisionTrainer.backward": "(self, loss)",
        "MixedPrecisionTrainer.optimize": "(self, opt)",
        "MixedPrecisionTrainer.master_params_to_state_dict": "(self, master_params)",
        "MixedPrecisionTrainer.state_dict_to_master_params": "(self, state_dict)",
    },
    "gaussian_diffusion": {
        "get_named_beta_schedule": "(schedule_name, num_diffusion_timesteps)",
        "betas_for_alpha_bar": "(num_diffusion_timesteps, alpha_bar, max_beta=0.999)",
        "ModelMeanType": None,
        "ModelVarType": None,
        "LossType.is_vb": "(self)",
        "GaussianDiffusion.__init__": "(self, *, betas, model_mean_type, model_var_type, loss_type, "
                                      "rescale_timesteps=False)",
        "GaussianDiffusion.q_mean_variance": "(self, x_start, t)",
        "GaussianDiffusion.q_sample": "(self, x_start, t, noise=None)",
        "GaussianDiffusion.q_posterior_mean_variance": "(self, x_start, x_t, t)",
        "GaussianDiffusion.p_mean_variance": "(self, model, x, t, clip_denoised=True, denoised_fn=None, "
                                             "model_kwargs=None)",
        "GaussianDiffusion.condition_mean": "(self, cond_fn, p_mean_var, x, t, model_kwargs=None)",
        "GaussianDiffusion.condition_score": "(self, cond_fn, p_mean_var, x, t, model_kwargs=None)",
        "GaussianDiffusion.p_sample": "(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, "
                                      "model_kwargs=None)",
        "GaussianDiffusion.p_sample_loop": "(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, "
                                           "cond_fn=None, model_kwargs=None, device=None, progress=False)",
        "GaussianDiffusion.p_sample_loop_progressive": "(self, model, shape, noise=None, clip_denoised=True, "
                                                       "denoised_fn=None, cond_fn=None, model_kwargs=None, "
                                                       "device=None, progress=False)",
        "GaussianDiffusion.ddim_sample": "(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, "
                                         "model_kwargs=None, eta=0.0)",
        "GaussianDiffusion.ddim_reverse_sample": "(self, model, x, t, clip_denoised=True, denoised_fn=None, "
                                                 "model_kwargs=None, eta=0.0)",
        "GaussianDiffusion.ddim_sample_loop": "(self, model, shape, noise=None, clip_denoised=True, "
                                              "denoised_fn=None, cond_fn=None, model_kwargs=None, device=None, "
                                              "progress=False, eta=0.0)",
        "GaussianDiffusion.ddim_sample_loop_progressive": "(self, model, shape, noise=None, clip_denoised=True, "
                                                          "denoised_fn=None, cond_fn=None, model_kwargs=None, "
                                                          "device=None, progress=False, eta=0.0)",
        "GaussianDiffusion.training_losses": "(self, model, x_start, t, model_kwargs=None, noise=None)",
        "GaussianDiffusion.calc_bpd_loop": "(self, model, x_start, clip_denoised=True, model_kwargs=None)",
    },
    "image_datasets": {
        "load_data": "(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, "
                     "random_crop=False, random_flip=True)",
        "ImageDataset.__init__": "(self, resolution, image_paths, classes=None, shard=0, num_shards=1, "
                                 "random_crop=False, random_flip=True)",
        "ImageDataset.__len__": "(self)",
        "ImageDataset.__getitem__": "(self, idx)",
        "center_crop_arr": "(pil_image, image_size)",
        "random_crop_arr": "(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0)",
    },
    "logger": {
        "configure": "(dir=None, format_strs=None, comm=None, log_suffix='')",
        "logkv": "(key, val)",
        "logkv_mean": "(key, val)",
        "logkvs": "(d)",
        "dumpkvs": "()",
        "getkvs": "()",
        "log": "(*args, level=INFO)",
        "debug": "(*args)",
        "info": "(*args)",
        "warn": "(*args)",
        "error": "(*args)",
        "set_level": "(level)",
        "get_dir": "()",
        "get_current": "()",
        "reset": "()",
        "record_tabular": "(key, val)",
        "dump_tabular": "()",
        "set_comm": "(comm)",
        "profile_kv": "(scopename)",
        "profile": "(n)",
        "scoped_configure": "(dir=None, format_strs=None, comm=None)",
        "make_output_format": "(format, ev_dir, log_suffix='')",
        "get_rank_without_mpi_import": "()",
        "mpi_weighted_mean": "(comm, local_name2valcount)",
        "KVWriter.writekvs": "(self, kvs)",
        "SeqWriter.writeseq": "(self, seq)",
        "HumanOutputFormat.__init__": "(self, filename_or_file)",
        "HumanOutputFormat.writekvs": "(self, kvs)",
        "HumanOutputFormat.writeseq": "(self, seq)",
        "HumanOutputFormat.close": "(self)",
        "JSONOutputFormat.__init__": "(self, filename)",
        "JSONOutputFormat.writekvs": "(self, kvs)",
        "JSONOutputFormat.close": "(self)",
        "CSVOutputFormat.__init__": "(self, filename)",
        "CSVOutputFormat.writekvs": "(self, kvs)",
        "CSVOutputFormat.close": "(self)",
        "TensorBoardOutputFormat.__init__": "(self, dir)",
        "TensorBoardOutputFormat.writekvs": "(self, kvs)",
        "TensorBoardOutputFormat.close": "(self)",
        "Logger.__init__": "(self, dir, output_formats, comm=None)",
        "Logger.logkv": "(self, key, val)",
        "Logger.logkv_mean": "(self, key, val)",
        "Logger.dumpkvs": "(self)",
        "Logger.log": "(self, *args, level=INFO)",
        "Logger.set_level": "(self, level)",
        "Logger.set_comm": "(self, comm)",
        "Logger.get_dir": "(self)",
        "Logger.close": "(self)",
    },
    "losses": {
        "normal_kl": "(mean1, logvar1, mean2, logvar2)",
        "approx_standard_normal_cdf": "(x)",
        "discretized_gaussian_log_likelihood": "(x, *, means, log_scales)",
    },
    "nn": {
        "SiLU.forward": "(self, x)",
        "GroupNorm32.forward": "(self, x)",
        "conv_nd": "(dims, *args, **kwargs)",
        "linear": "(*args, **kwargs)",
        "avg_pool_nd": "(dims, *args, **kwargs)",
        "update_ema": "(target_params, source_params, rate=0.99)",
        "zero_module": "(module)",
        "scale_module": "(module, scale)",
        "mean_flat": "(tensor)",
        "normalization": "(channels)",
        "timestep_embedding": "(timesteps, dim, max_period=10000)",
        "checkpoint": "(func, inputs, params, flag)",
        "CheckpointFunction.forward": "(ctx, run_function, length, *args)",
        "CheckpointFunction.backward": "(ctx, *output_grads)",
    },
    "resample": {
        "create_named_schedule_sampler": "(name, diffusion)",
        "ScheduleSampler.weights": "(self)",
        "ScheduleSampler.sample": "(self, batch_size, device)",
        "UniformSampler.__init__": "(self, diffusion)",
        "UniformSampler.weights": "(self)",
        "LossAwareSampler.update_with_local_losses": "(self, local_ts, local_losses)",
        "LossAwareSampler.update_with_all_losses": "(self, ts, losses)",
        "LossSecondMomentResampler.__init__": "(self, diffusion, history_per_term=10, uniform_prob=0.001)",
        "LossSecondMomentResampler.weights": "(self)",
        "LossSecondMomentResampler.update_with_all_losses": "(self, ts, losses)",
    },
    "respace": {
        "space_timesteps": "(num_timesteps, section_counts)",
        "SpacedDiffusion.__init__": "(self, use_timesteps, **kwargs)",
        "SpacedDiffusion.p_mean_variance": "(self, model, *args, **kwargs)",
        "SpacedDiffusion.training_losses": "(self, model, *args, **kwargs)",
        "SpacedDiffusion.condition_mean": "(self, cond_fn, *args, **kwargs)",
        "SpacedDiffusion.condition_score": "(self, cond_fn, *args, **kwargs)",
        "_WrappedModel.__init__": "(self, model, timestep_map, rescale_timesteps, original_num_steps)",
    },
    "script_util": {
        "diffusion_defaults": "()",
        "classifier_defaults": "()",
        "model_and_diffusion_defaults": "()",
        "classifier_and_diffusion_defaults": "()",
        "create_model_and_diffusion": "(image_size, class_cond, learn_sigma, num_channels, num_res_blocks, "
                                      "channel_mult, num_heads, num_head_channels, num_heads_upsample, "
                                      "attention_resolutions, dropout, diffusion_steps, noise_schedule, "
                                      "timestep_respacing, use_kl, predict_xstart, rescale_timesteps, "
                                      "rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, "
                                      "resblock_updown, use_fp16, use_new_attention_order)",
        "create_model": "(image_size, num_channels, num_res_blocks, channel_mult='', learn_sigma=False, "
                        "class_cond=False, use_checkpoint=False, attention_resolutions='16', num_heads=1, "
                        "num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0, "
                        "resblock_updown=False, use_fp16=False, use_new_attention_order=False)",
        "create_classifier_and_diffusion": "(image_size, classifier_use_fp16, classifier_width, classifier_depth, "
                                           "classifier_attention_resolutions, classifier_use_scale_shift_norm, "
                                           "classifier_resblock_updown, classifier_pool, learn_sigma, "
                                           "diffusion_steps, noise_schedule, timestep_respacing, use_kl, "
                                           "predict_xstart, rescale_timesteps, rescale_learned_sigmas)",
        "create_classifier": "(image_size, classifier_use_fp16, classifier_width, classifier_depth, "
                             "classifier_attention_resolutions, classifier_use_scale_shift_norm, "
                             "classifier_resblock_updown, classifier_pool)",
        "sr_model_and_diffusion_defaults": "()",
        "sr_create_model_and_diffusion": "(large_size, small_size, class_cond, learn_sigma, num_channels, "
                                         "num_res_blocks, num_heads, num_head_channels, num_heads_upsample, "
                                         "attention_resolutions, dropout, diffusion_steps, noise_schedule, "
                                         "timestep_respacing, use_kl, predict_xstart, rescale_timesteps, "
                                         "rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, "
                                         "resblock_updown, use_fp16)",
        "sr_create_model": "(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, "
                           "use_checkpoint, attention_resolutions, num_heads, num_head_channels, "
                           "num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_fp16)",
        "create_gaussian_diffusion": "(*, steps=1000, learn_sigma=False, sigma_small=False, "
                                     "noise_schedule='linear', use_kl=False, predict_xstart=False, "
                                     "rescale_timesteps=False, rescale_learned_sigmas=False, timestep_respacing='')",
        "add_dict_to_argparser": "(parser, default_dict)",
        "args_to_dict": "(args, keys)",
        "str2bool": "(v)",
    },
    "train_util": {
        "TrainLoop.__init__": "(self, *, model, diffusion, data, batch_size, microbatch, lr, ema_rate, "
                              "log_interval, save_interval, resume_checkpoint, use_fp16=False, "
                              "fp16_scale_growth=0.001, schedule_sampler=None, weight_decay=0.0, lr_anneal_steps=0)",
        "TrainLoop.run_loop": "(self)",
        "TrainLoop.run_step": "(self, batch, cond)",
        "TrainLoop.forward_backward": "(self, batch, cond)",
        "TrainLoop.log_step": "(self)",
        "TrainLoop.save": "(self)",
        "parse_resume_step_from_filename": "(filename)",
        "get_blob_logdir": "()",
        "find_resume_checkpoint": "()",
        "find_ema_checkpoint": "(main_checkpoint, step, rate)",
        "log_loss_dict": "(diffusion, ts, losses)",
    },
    "unet": {
        "AttentionPool2d.__init__": "(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None)",
        "AttentionPool2d.forward": "(self, x)",
        "TimestepBlock.forward": "(self, x, emb)",
        "TimestepEmbedSequential.forward": "(self, x, emb)",
        "Upsample.__init__": "(self, channels, use_conv, dims=2, out_channels=None)",
        "Upsample.forward": "(self, x)",
        "Downsample.__init__": "(self, channels, use_conv, dims=2, out_channels=None)",
        "Downsample.forward": "(self, x)",
        "ResBlock.__init__": "(self, channels, emb_channels, dropout, out_channels=None, use_conv=False, "
                             "use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False)",
        "ResBlock.forward": "(self, x, emb)",
        "AttentionBlock.__init__": "(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, "
                                   "use_new_attention_order=False)",
        "AttentionBlock.forward": "(self, x)",
        "count_flops_attn": "(model, _x, y)",
        "QKVAttentionLegacy.__init__": "(self, n_heads)",
        "QKVAttentionLegacy.forward": "(self, qkv)",
        "QKVAttentionLegacy.count_flops": "(model, _x, y)",
        "QKVAttention.__init__": "(self, n_heads)",
        "QKVAttention.forward": "(self, qkv)",
        "QKVAttention.count_flops": "(model, _x, y)",
        "UNetModel.__init__": "(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, "
                              "attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, "
                              "dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, "
                              "num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, "
                              "resblock_updown=False, use_new_attention_order=False)",
        "UNetModel.convert_to_fp16": "(self)",
        "UNetModel.convert_to_fp32": "(self)",
        "UNetModel.forward": "(self, x, timesteps, y=None)",
        "SuperResModel.__init__": "(self, image_size, in_channels, *args, **kwargs)",
        "SuperResModel.forward": "(self, x, timesteps, low_res=None, **kwargs)",
        "EncoderUNetModel.__init__": "(self, image_size, in_channels, model_channels, out_channels, "
                                     "num_res_blocks, attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), "
                                     "conv_resample=True, dims=2, use_checkpoint=False, use_fp16=False, "
                                     "num_heads=1, num_head_channels=-1, num_heads_upsample=-1, "
                                     "use_scale_shift_norm=False, resblock_updown=False, "
                                     "use_new_attention_order=False, pool='adaptive')",
        "EncoderUNetModel.convert_to_fp16": "(self)",
        "EncoderUNetModel.convert_to_fp32": "(self)",
        "EncoderUNetModel.forward": "(self, x, timesteps)",
    },
}
UPSTREAM_CONSTANTS = {"INFO": 20, "INITIAL_LOG_LOSS_SCALE": 20.0}
# Upstream's module-level values (besides functions and classes).
UPSTREAM_VALUES = {
    "logger": {"DEBUG": 10, "INFO": 20, "WARN": 30, "ERROR": 40, "DISABLED": 50},
    "fp16_util": {"INITIAL_LOG_LOSS_SCALE": 20.0},
    "train_util": {"INITIAL_LOG_LOSS_SCALE": 20.0},
}
CASES = [(module, name) for module, names in UPSTREAM.items() for name in names]


def upstream_signature(text):
    namespace = dict(UPSTREAM_CONSTANTS)
    exec(f"def f{text}: pass", namespace)
    return inspect.signature(namespace["f"])


def lookup(module, dotted):
    obj = importlib.import_module(f"guided_diffusion.{module}")
    for part in dotted.split("."):
        assert hasattr(obj, part), f"guided_diffusion.{module} has no {dotted}"
        obj = inspect.getattr_static(obj, part) if inspect.isclass(obj) else getattr(obj, part)
    return obj.__func__ if isinstance(obj, (staticmethod, classmethod)) else obj


@pytest.mark.parametrize("module,name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_upstream_name_exists_with_compatible_signature(module, name):
    ours = lookup(module, name)
    expected_text = UPSTREAM[module][name]
    if expected_text is None:
        assert inspect.isclass(ours)
        return
    expected = list(upstream_signature(expected_text).parameters.values())
    got = list(inspect.signature(ours).parameters.values())
    # Upstream's parameters, in order, with the same kinds and defaults ...
    assert [(p.name, p.kind, p.default) for p in got[: len(expected)]] == [
        (p.name, p.kind, p.default) for p in expected
    ], f"{module}.{name}{inspect.signature(ours)} != upstream {expected_text}"
    # ... and anything added after them optional, so every upstream call still binds the same way.
    for extra in got[len(expected):]:
        assert extra.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD) or (
            extra.default is not inspect.Parameter.empty
        ), f"{module}.{name}: added parameter {extra.name} is required"


def test_wrapped_model_maps_step_indices_as_upstreams():
    from guided_diffusion.respace import _WrappedModel

    seen = []
    wrapped = _WrappedModel(lambda x, t: seen.append(t.tolist()), [0, 20, 40], False, 1000)
    wrapped(torch.zeros(1), torch.tensor([1]))
    assert seen == [[20]] and (wrapped.timestep_map, wrapped.rescale_timesteps, wrapped.original_num_steps) == (
        [0, 20, 40], False, 1000)
    _WrappedModel(lambda x, t: seen.append(t.tolist()), [0, 20, 40], True, 4000)(torch.zeros(1), torch.tensor([2]))
    assert seen[-1] == [10.0]


def test_upstream_module_values():
    for module, values in UPSTREAM_VALUES.items():
        mod = importlib.import_module(f"guided_diffusion.{module}")
        assert {name: getattr(mod, name, None) for name in values} == values, module


def test_logger_classes_are_upstreams():
    from guided_diffusion import logger

    assert issubclass(logger.HumanOutputFormat, logger.KVWriter)
    assert issubclass(logger.HumanOutputFormat, logger.SeqWriter)
    for name in ("JSONOutputFormat", "CSVOutputFormat", "TensorBoardOutputFormat"):
        assert issubclass(getattr(logger, name), logger.KVWriter)
        assert not issubclass(getattr(logger, name), logger.SeqWriter)
    assert hasattr(logger.Logger, "CURRENT") and hasattr(logger.Logger, "DEFAULT")
    logger.reset()
    try:
        assert logger.get_current() is logger.Logger.CURRENT
        assert logger.getkvs() is logger.get_current().name2val
    finally:
        logger.reset()


def test_logger_all_ranks_is_keyword_only_and_comm_is_not_all_ranks(tmp_path):
    from guided_diffusion import logger

    params = inspect.signature(logger.configure).parameters
    assert params["all_ranks"].kind is inspect.Parameter.KEYWORD_ONLY
    current = logger.configure(str(tmp_path), ["log"], object())  # a positional communicator
    try:
        assert current.comm is not None
        logger.logkv(key="a", val=1.5)
        logger.logkv_mean(key="b", val=2.0)
        logger.logkv_mean(key="b", val=4.0)
        assert logger.dumpkvs() == {"a": 1.5, "b": 3.0}  # one process: the average over ranks is its own
    finally:
        logger.reset()


# --- attributes and fp32 conversion -----------------------------------------------------------------------


def tiny_unet(**overrides):
    args = su.model_and_diffusion_defaults()
    args.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                attention_resolutions="16,8", num_head_channels=16, learn_sigma=True)
    args.update(overrides)
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**args)
    with torch.no_grad():  # random weights everywhere (upstream zero-initialises output layers)
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval(), diffusion


def tiny_classifier(image_size=64, pool="adaptive"):
    args = su.classifier_defaults()
    args.update(image_size=image_size, classifier_width=64, classifier_depth=1,
                classifier_attention_resolutions="16", classifier_pool=pool)
    torch.manual_seed(0)
    return su.create_classifier(**args).eval()


def test_public_attributes_of_blocks_and_models():
    model, _ = tiny_unet(resblock_updown=False)
    res = model.input_blocks[1][0]
    assert (res.channels, res.emb_channels, res.dropout, res.use_conv) == (32, 128, 0.0, False)
    down = model.input_blocks[2][0]
    assert (down.use_conv, down.dims, down.channels) == (True, 2, 32)
    classifier = tiny_classifier()
    expected = dict(num_res_blocks=1, attention_resolutions=(4,), dropout=0, channel_mult=(1, 2, 3, 4),
                    conv_resample=True, num_heads=1, num_head_channels=64, num_heads_upsample=1)
    assert {k: getattr(classifier, k) for k in expected} == expected


@pytest.mark.parametrize("build", ["unet", "superres", "classifier"])
def test_convert_to_fp32_undoes_convert_to_fp16(build):
    if build == "unet":
        model = tiny_unet()[0]
    elif build == "superres":
        args = su.sr_model_and_diffusion_defaults()
        args.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, num_head_channels=16,
                    attention_resolutions="8")
        model = su.sr_create_model_and_diffusion(**args)[0]
    else:
        model = tiny_classifier()
    conv = model.input_blocks[0][0]
    model.convert_to_fp16()
    assert conv.weight.dtype == torch.float16
    model.convert_to_fp32()
    assert conv.weight.dtype == torch.float32
    assert not hasattr(model, "convert_to_f32")  # upstream's names only


# --- the attention submodules ------------------------------------------------------------------------------


def upstream_qkv_attention(qkv, heads, legacy):
    """Upstream's einsum formulation of QKVAttentionLegacy / QKVAttention."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    scale = 1 / math.sqrt(math.sqrt(ch))
    if legacy:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(bs * heads, ch, length) for part in qkv.chunk(3, dim=1))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
def test_qkv_attention_modules_compute_upstreams_attention(legacy):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * 4 * 8, 10)
    module = QKVAttentionLegacy(4) if legacy else QKVAttention(4)
    assert list(module.parameters()) == [] and module.n_heads == 4
    expected = upstream_qkv_attention(qkv, 4, legacy)
    assert torch.allclose(module(qkv), expected, atol=1e-5)
    assert not torch.allclose(upstream_qkv_attention(qkv, 4, not legacy), expected, atol=1e-3)


def test_attention_blocks_own_the_submodule_and_its_override():
    model, _ = tiny_unet()
    blocks = attention_blocks(model)
    assert all(type(b.attention) is QKVAttentionLegacy for b in blocks.values())
    assert not any(".attention." in name for name in model.state_dict())  # no parameters: names unchanged
    new_order = AttentionBlock(32, num_heads=2, use_new_attention_order=True)
    assert type(new_order.attention) is QKVAttention
    block = blocks["middle_block.1"]
    override = AttentionOverride(identity_attention)
    block.override = override
    assert block.attention.override is override and block.override is override
    block.override = None
    assert block.attention.override is None
    classifier = tiny_classifier(pool="attention")
    assert type(classifier.out[-1].attention) is QKVAttention


def legacy_v(qkv, heads):
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    return qkv.reshape(bs * heads, 3 * ch, length).split(ch, dim=1)[2].reshape(bs, -1, length)


def test_hook_on_qkv_attention_legacy_sees_the_perturbed_map():
    model, _ = tiny_unet()
    blocks = attention_blocks(model)
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = (inputs[0].detach(), output.detach())
        return record

    handles = [b.attention.register_forward_hook(hook(n)) for n, b in blocks.items()]
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    try:
        with torch.no_grad():
            base = model(x, t)
            with pag.perturbed_attention(model, ["middle_block.1"]):
                perturbed = model(x, t)
    finally:
        for h in handles:
            h.remove()
    qkv, out = seen["middle_block.1"]
    heads = blocks["middle_block.1"].num_heads
    assert torch.allclose(out, legacy_v(qkv, heads), atol=1e-6)  # identity map: the output is V
    qkv, out = seen["output_blocks.1.1"]  # not perturbed: real attention
    assert not torch.allclose(out, legacy_v(qkv, blocks["output_blocks.1.1"].num_heads), atol=1e-3)
    assert (perturbed - base).abs().max() > 1e-3


def test_patching_qkv_attention_legacy_changes_what_blocks_compute(monkeypatch):
    model, _ = tiny_unet()
    calls = []
    original = QKVAttentionLegacy.forward

    def patched(self, qkv):
        calls.append(qkv.shape)
        return original(self, qkv) * 0  # attention switched off: blocks reduce to their skip path

    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        base = model(x, t)
        monkeypatch.setattr(QKVAttentionLegacy, "forward", patched)
        out = model(x, t)
    assert len(calls) == len(attention_blocks(model))
    assert (out - base).abs().max() > 1e-3


def test_count_flops_attn_counts_two_matmuls():
    class Counter:
        total_ops = torch.zeros(1, dtype=torch.float64)

    out = QKVAttentionLegacy(2)(torch.randn(3, 3 * 16, 25))  # N=3, C=16, T=25
    counter = Counter()
    QKVAttentionLegacy.count_flops(counter, (None,), out)
    assert counter.total_ops.item() == 2 * 3 * 25**2 * 16
    count_flops_attn(counter, (None,), (out,))
    assert counter.total_ops.item() == 2 * (2 * 3 * 25**2 * 16)


# --- inputs upstream accepts ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [48, 64])
def test_unet_runs_on_other_image_sizes(size):
    model, _ = tiny_unet(class_cond=True)
    x, t, y = torch.randn(2, 3, size, size), torch.tensor([3, 400]), torch.tensor([1, 7])
    with torch.no_grad():
        out = model(x, t, y=y)
        staged = model.finish(model.run(model.begin(x, t, y=y)))
    assert out.shape == (2, 6, size, size) and torch.isfinite(out).all()
    assert torch.equal(out, staged)


def test_one_timestep_broadcasts_over_the_batch():
    model, _ = tiny_unet(class_cond=True)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 5, 9])
    with torch.no_grad():
        one = model(x, torch.tensor([250]), y=y)
        each = model(x, torch.tensor([250, 250, 250]), y=y)
        with pag.perturbed_attention(model, ["middle_block.1"]):
            assert model(x, torch.tensor([250]), y=y).shape == (3, 6, 32, 32)
    assert torch.allclose(one, each, atol=1e-6)
    classifier = tiny_classifier()
    with torch.no_grad():
        assert torch.allclose(classifier(x, torch.tensor([9])), classifier(x, torch.tensor([9, 9, 9])), atol=1e-6)


def test_adaptive_pool_classifier_runs_on_smaller_images():
    classifier = tiny_classifier(image_size=64, pool="adaptive")
    with torch.no_grad():
        logits = classifier(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert logits.shape == (2, 1000)
    attention = tiny_classifier(image_size=64, pool="attention")
    with pytest.raises(ValueError, match=r"classifier expects images of shape \(N, 3, 64, 64\)"):
        attention(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))


def test_superres_runs_on_other_sizes_and_keeps_clear_errors():
    args = su.sr_model_and_diffusion_defaults()
    args.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, num_head_channels=16,
                attention_resolutions="8")
    model, _ = su.sr_create_model_and_diffusion(**args)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([3]), low_res=torch.randn(1, 3, 16, 16))
    assert out.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="low_res must hold one 3-channel image"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([3]), low_res=torch.randn(1, 1, 16, 16))


def test_what_cannot_work_still_gets_clear_errors():
    model, _ = tiny_unet()
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\) \(or any sides that are multiples of 4\)"):
        model(torch.randn(2, 1, 32, 32), t)  # wrong channel count
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(2, 3, 30, 30), t)  # the skip connections could not meet again
    with pytest.raises(ValueError, match="one for the batch"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]))
    cond, _ = tiny_unet(class_cond=True)
    with pytest.raises(ValueError, match="needs labels"):
        cond(torch.randn(2, 3, 32, 32), t)
