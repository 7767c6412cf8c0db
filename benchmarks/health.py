"""Section 1 of the GPU check, low-precision health: every guidance method in float16 (bfloat16 on the CPU) at
three timesteps, against float32 with the same weights and TF32 off; no inf/NaN in any attention block's output or
in eps, and eps within a stated tolerance."""

import copy

import torch

import pag
from evaluations.features import full_float32  # the one float32-without-TF32 context
from guided_diffusion.unet import attention_blocks
from sampling.model_configs import load_model_config
from sampling.models import set_compute_dtype

from .models import ARCHS, CLASSIFIER, PAG_SCALE, build, diffusion_flags, log

HEALTH_TIMESTEPS = (999, 500, 10)
SAG_SCALE = 1.0

# Low precision vs float32 agreement of eps, and why these bounds (the report quotes TOLERANCE_WHY).
TOLERANCE = {"float16": {"unguided": 1e-2, "guided": 3e-2}, "bfloat16": {"unguided": 8e-2, "guided": 0.24}}
TOLERANCE_WHY = (
    "relative RMS difference ||e_low - e32|| / ||e32|| of eps vs float32 (TF32 off), same weights and inputs. "
    "float16 rounds to 2^-11 (4.9e-4) relative per operation; the U-Net's ~80 layers (GroupNorm re-normalising "
    "after every residual branch) accumulate a few 1e-3 in one pass, and guidance eps + s (eps - eps') weighs two "
    "passes' errors by 1 + s and s (s = 3). Measured on the CPU at tiny widths (every method, t = 999, 500, 10; "
    "random weights): float16 <= 2.0e-3 unguided, <= 5.9e-3 guided; bfloat16 (2^-8, 8 times coarser) <= 1.5e-2 "
    "and <= 4.7e-2; the bounds are 5 times that. Overflow, a saturated softmax or a wrong cast shows as inf/NaN or "
    "an error of order 1. Random weights keep activations small (see max abs attention output): overflow that "
    "only trained weights provoke needs --model_dir with the official checkpoints.")


def _hooks(networks):
    """Forward hooks on every attention block: record whether its output is finite and its largest value."""
    stats = {"nonfinite_blocks": set(), "max_abs": 0.0}
    handles = []
    for prefix, net in networks.items():
        for name, block in attention_blocks(net).items():
            def hook(module, inputs, output, name=f"{prefix}{name}"):
                out = output.detach()
                if not bool(torch.isfinite(out).all()):
                    stats["nonfinite_blocks"].add(name)
                else:
                    stats["max_abs"] = max(stats["max_abs"], float(out.abs().max()))
            handles.append(block.register_forward_hook(hook))
    return stats, handles


def _guided_eps(model, classifier, diffusion, method, x, t, y, row_seeds):
    """eps of ``method`` (first 3 output channels); with classifier guidance, upstream's condition_score."""
    guided = pag.guide(model, pag.GuidanceConfig(**method["guidance"]), diffusion=diffusion)
    kwargs = {"y": y} if model.num_classes else {}
    with torch.no_grad():
        eps = guided(x, t, row_seeds=row_seeds, **kwargs)[:, :3].float()
    if method.get("classifier"):
        cond_fn = pag.classifier_cond_fn(classifier, method["classifier_scale"])
        abar = torch.as_tensor(diffusion.alphas_cumprod, device=x.device)[t].float().reshape(-1, 1, 1, 1)
        eps = eps - (1 - abar).sqrt() * cond_fn(x, t, y=y).float()
    return eps


def health_methods(classifier_scale=1.0, tiny=False):
    methods = [{"name": "unguided", "guidance": {}}]
    for kind in pag.REGISTRY:
        guidance = dict(pag_scale=PAG_SCALE, perturbation=kind)
        if tiny and kind == "blur":  # the tiny model's 2x2 blocks: a 4x4 map takes no 9x9 reflect-padded kernel
            guidance["blur_kernel_size"] = 3
        methods.append({"name": f"pag {kind}", "guidance": guidance})
    methods.append({"name": "sag", "guidance": dict(sag_scale=SAG_SCALE)})
    methods.append({"name": "pag identity + classifier", "guidance": dict(pag_scale=PAG_SCALE),
                    "classifier": True, "classifier_scale": classifier_scale})
    return methods


def check_health(device, profile, tiny, num_channels, model_dir, seed, dtype):
    """Every method at every health timestep in ``dtype`` (a name; float16 on a GPU: upstream's
    ``convert_to_fp16``) against float32 with the same weights."""
    cases, weights = [], {}
    for arch in ARCHS:  # the build order sets the global RNG state that the label embedding draws from
        flags = diffusion_flags(arch, tiny, num_channels)
        model32, diffusion, weights[arch] = build("diffusion", flags, device, seed, model_dir, arch)
        model_low = set_compute_dtype(copy.deepcopy(model32), dtype)  # float16: convert_to_fp16()
        classifier32, _, weights[CLASSIFIER] = build("classifier", diffusion_flags(CLASSIFIER, tiny), device,
                                                     seed + 1, model_dir, CLASSIFIER)
        classifier_low = set_compute_dtype(copy.deepcopy(classifier32), dtype)
        scale = float(load_model_config(arch).get("classifier", {}).get("scale", 1.0))
        size, batch = flags["image_size"], profile.health_batch
        for method in health_methods(scale, tiny):
            log(f"health: {arch} {method['name']}")
            for step in HEALTH_TIMESTEPS:
                gen = torch.Generator().manual_seed(seed * 1000 + step)
                x = torch.randn(batch, 3, size, size, generator=gen).to(device)
                y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
                t = torch.full((batch,), step, device=device, dtype=torch.long)
                inputs = (diffusion, method, x, t, y, tuple(range(batch)))
                stats, handles = _hooks({"": model_low, "classifier:": classifier_low})
                try:
                    eps_low = _guided_eps(model_low, classifier_low, *inputs)
                finally:
                    for handle in handles:
                        handle.remove()
                with full_float32():
                    eps32 = _guided_eps(model32, classifier32, *inputs)
                finite = bool(torch.isfinite(eps_low).all())
                diff = (eps_low - eps32) if finite else None
                rel_rms = float(diff.norm() / eps32.norm().clamp_min(1e-30)) if finite else None
                rel_max = float(diff.abs().max() / eps32.abs().max().clamp_min(1e-30)) if finite else None
                tolerance = TOLERANCE[dtype]["unguided" if method["name"] == "unguided" else "guided"]
                ok = finite and not stats["nonfinite_blocks"] and rel_rms <= tolerance
                cases.append({"arch": arch, "method": method["name"], "t": step, "finite_eps": finite,
                              "nonfinite_attention_blocks": sorted(stats["nonfinite_blocks"]),
                              "max_abs_attention_output": stats["max_abs"], "rel_rms": rel_rms,
                              "rel_max": rel_max, "tolerance": tolerance, "ok": ok})
        del model_low, model32, classifier_low, classifier32
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"dtype": dtype, "cases": cases, "ok": all(c["ok"] for c in cases), "tolerance": TOLERANCE[dtype],
            "tolerance_why": TOLERANCE_WHY, "weights": weights, "batch": profile.health_batch,
            "pag_scale": PAG_SCALE, "sag_scale": SAG_SCALE, "timesteps": list(HEALTH_TIMESTEPS),
            "classifier": f"256x256_classifier flags, converted to {dtype} in the {dtype} run"}
