"""The ADM fork: checkpoint compatibility, attention formulation, overrides, conformance, bad input."""

import math

import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.attention import AttentionOverride, attention_map, identity_attention
from guided_diffusion.fp16_util import convert_module_to_f16, convert_module_to_f32
from guided_diffusion.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from guided_diffusion.unet import AttentionBlock, attention_block_info, attention_blocks


def build_from_entry(name, flags):
    """Build an official checkpoint's architecture from its upstream flags, on the meta device."""
    with torch.device("meta"):
        if "classifier" in name:
            args = su.classifier_defaults()
            args.update(flags)
            return su.create_classifier(**args)
        if "upsampler" in name:
            args = su.sr_model_and_diffusion_defaults()
            args.update(flags)
            return su.sr_create_model_and_diffusion(**args)[0]
        args = su.model_and_diffusion_defaults()
        args.update(flags)
        return su.create_model_and_diffusion(**args)[0]


ENTRIES = [
    "64x64_diffusion", "128x128_diffusion", "256x256_diffusion", "256x256_diffusion_uncond",
    "512x512_diffusion", "lsun_bedroom", "64_256_upsampler", "128_512_upsampler",
    "64x64_classifier", "128x128_classifier", "256x256_classifier", "512x512_classifier",
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_official_architectures_match_checkpoint_names_and_shapes(adm_checkpoints, entry):
    ref = adm_checkpoints[entry]
    model = build_from_entry(entry, ref["flags"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(ref["state_dict"])  # same names, in upstream's order
    assert shapes == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    assert list(attention_blocks(model)) == ref["attention_blocks"]


def test_all_twelve_entries_are_covered(adm_checkpoints):
    """Every official checkpoint has a shipped model config (what --model and the downloads use), and the
    reference data lists exactly those: a checkpoint without a config, or a config for none, fails here."""
    from sampling.model_configs import CONFIG_DIR, load_model_config

    shipped = {p.stem: load_model_config(p) for p in CONFIG_DIR.glob("*.yaml")}
    assert sorted(shipped) == sorted(adm_checkpoints) and len(shipped) == 12
    for name, config in shipped.items():
        assert config["name"] == name and config["file"] == f"{name}.pt"


def small_model(weight_scale=0.2, **overrides):
    args = su.model_and_diffusion_defaults()
    args.update(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                attention_resolutions="16,8", num_head_channels=16, learn_sigma=True)
    args.update(overrides)
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(**args)
    # Random weights everywhere (upstream zero-initialises output layers, which would hide errors).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * weight_scale)
    return model.eval(), diffusion


def einsum_attention_legacy(qkv, heads):
    """Upstream's legacy formulation: heads split before q/k/v."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).float().softmax(dim=-1).type(qkv.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def einsum_attention_new(qkv, heads):
    """Upstream's new order: q/k/v split first, then heads."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum(
        "bct,bcs->bts", (q * scale).reshape(bs * heads, ch, length), (k * scale).reshape(bs * heads, ch, length)
    ).float().softmax(dim=-1).type(qkv.dtype)
    return torch.einsum("bts,bcs->bct", weight, v.reshape(bs * heads, ch, length)).reshape(bs, -1, length)


def random_block(new_order, channels=64, heads=4):
    torch.manual_seed(1)
    block = AttentionBlock(channels, num_heads=heads, use_new_attention_order=new_order)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return block


def reference_block_output(block, x, attention):
    b, c, *spatial = x.shape
    flat = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(flat))
    h = block.proj_out(attention(qkv, block.num_heads))
    return (flat + h).reshape(b, c, *spatial)


@pytest.mark.parametrize("new_order", [False, True])
def test_sdpa_attention_matches_upstream_einsum(new_order):
    block = random_block(new_order)
    x = torch.randn(3, 64, 8, 8)
    reference = einsum_attention_new if new_order else einsum_attention_legacy
    with torch.no_grad():
        expected = reference_block_output(block, x, reference)
        got = block(x)
    assert (got - expected).abs().max().item() < 1e-5
    # The two orders really differ on the same weights (the test would notice a swapped layout).
    other = einsum_attention_legacy if new_order else einsum_attention_new
    with torch.no_grad():
        assert (reference_block_output(block, x, other) - got).abs().max().item() > 1e-3


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_fp16_does_not_overflow(new_order):
    block = random_block(new_order)
    block.apply(convert_module_to_f16)  # as the U-Net's torso: norms stay float32
    # Large activations: a naive fp16 q.k^T over 16 channels would exceed 65504.
    x = (torch.randn(2, 64, 8, 8) * 60).half()
    with torch.no_grad():
        got = block(x)
        block.apply(convert_module_to_f32)
        reference = einsum_attention_new if new_order else einsum_attention_legacy
        expected = reference_block_output(block, x.float(), reference)
    assert torch.isfinite(got).all()
    rel = (got.float() - expected).abs().max() / expected.abs().max()
    assert rel.item() < 2e-2


@pytest.mark.parametrize("new_order", [False, True])
def test_identity_override_outputs_v(new_order):
    block = random_block(new_order)
    block.override = AttentionOverride(identity_attention)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, 64, -1)
        qkv = block.qkv(block.norm(flat))
        if new_order:
            v = qkv.chunk(3, dim=1)[2]
        else:
            v = qkv.reshape(2 * block.num_heads, 3 * 16, -1).split(16, dim=1)[2].reshape(2, 64, -1)
        expected = (flat + block.proj_out(v)).reshape(x.shape)
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_override_applies_per_batch_row_only():
    model, _ = small_model()
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([10, 500, 900, 999])
    layers = ["input_blocks.3.1", "middle_block.1"]
    blocks = attention_blocks(model)
    with torch.no_grad():
        base = model(x, t)
        for name in layers:
            blocks[name].override = AttentionOverride(identity_attention)
        perturbed = model(x, t)
        mask = torch.tensor([True, False, False, True])
        for name in layers:
            blocks[name].override = AttentionOverride(identity_attention, rows=mask)
        mixed = model(x, t)
    assert (base - perturbed).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the perturbation matters
    assert torch.allclose(mixed[mask], perturbed[mask], atol=1e-5)
    assert torch.allclose(mixed[~mask], base[~mask], atol=1e-5)


def test_running_in_stages_equals_forward_and_second_half_rows():
    model, _ = small_model(class_cond=True)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([100, 700]), torch.tensor([3, 999])
    blocks = attention_blocks(model)
    layers = ["input_blocks.3.1", "middle_block.1", "output_blocks.1.1"]
    split = model.stage_of("input_blocks.3.1")
    assert model.stage_names[split] == "input_blocks.3"
    assert model.stage_of("middle_block.1") == len(model.input_blocks)
    with pytest.raises(ValueError, match="not inside any block"):
        model.stage_of("out.0")
    with torch.no_grad():
        base = model(x, t, y=y)
        prefix = model.run(model.begin(x, t, y=y), until=split)
        assert prefix.next_stage == split and len(prefix.skips) == split
        with pytest.raises(ValueError, match="run it to the end"):
            model.finish(prefix)
        with pytest.raises(ValueError, match=f"cannot run from stage {split} to stage 1"):
            model.run(prefix, until=1)
        resumed = model.finish(model.run(prefix))
        for name in layers:
            blocks[name].override = AttentionOverride(identity_attention)
        perturbed = model(x, t, y=y)
        for name in layers:
            blocks[name].override = AttentionOverride(identity_attention, rows="second_half")
        both = model.finish(model.run(prefix.repeat(2)))
    assert torch.equal(resumed, base)  # the state is not consumed by the first continuation
    assert both.shape == (4, 6, 32, 32)
    assert torch.allclose(both[:2], base, atol=1e-5)
    assert torch.allclose(both[2:], perturbed, atol=1e-5)
    assert (both[2:] - base).abs().max() > 1e-3


def test_override_validation():
    with pytest.raises(ValueError, match="rows"):
        AttentionOverride(identity_attention, rows="first_half")
    with pytest.raises(ValueError, match="even batch"):
        AttentionOverride(identity_attention, rows="second_half").row_mask(3, "cpu")
    override = AttentionOverride(identity_attention, rows=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="3 rows"):
        override.row_mask(3, "cpu")
    # attend_rows takes a slice as the contiguous rows lo:hi, so a stepped slice (which row_mask would honour)
    # is refused instead of perturbing other rows than the block skips.
    with pytest.raises(ValueError, match="contiguous"):
        AttentionOverride(identity_attention, rows=slice(0, 4, 2))
    assert AttentionOverride(identity_attention, rows=slice(1, 3)).row_mask(4, "cpu").tolist() == [False, True, True,
                                                                                                    False]


def test_conformance_with_authors_forward(pag_reference):
    args = su.model_and_diffusion_defaults()
    args.update(pag_reference["flags"])
    model, _ = su.create_model_and_diffusion(**args)
    load_checkpoint(model, pag_reference["state_dict"])
    model.eval()
    x, t = pag_reference["x"], pag_reference["t"]
    with torch.no_grad():
        base = model(x, t)
        assert (base - pag_reference["forward_base"]).abs().max().item() < 1e-4
        blocks = attention_blocks(model)
        for name in pag_reference["layers"]:
            blocks[name].override = AttentionOverride(identity_attention)
        identity = model(x, t)
    assert (identity - pag_reference["forward_identity"]).abs().max().item() < 1e-4
    assert (pag_reference["forward_identity"] - pag_reference["forward_base"]).abs().max().item() > 1e-2


def test_attention_block_info_reports_resolution_channels_heads(adm_checkpoints):
    model = build_from_entry("256x256_diffusion_uncond", adm_checkpoints["256x256_diffusion_uncond"]["flags"])
    info = {name: (res, ch, heads) for name, res, ch, heads in attention_block_info(model)}
    assert info["input_blocks.10.1"] == (32, 512, 8)
    assert info["input_blocks.14.1"] == (16, 1024, 16)
    assert info["input_blocks.17.1"] == (8, 1024, 16)
    assert info["middle_block.1"] == (8, 1024, 16)
    assert info["output_blocks.2.1"] == (8, 1024, 16)
    assert info["output_blocks.8.1"] == (32, 512, 8)


def test_attention_map_rows_sum_to_one():
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    weights = attention_map(q, k)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 5))
    expected = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_fp16_conversion_matches_float32():
    # Smaller random weights: at 0.2 the activations of this random net exceed fp16's range.
    model, _ = small_model(weight_scale=0.1)
    half_model, _ = small_model(use_fp16=True)
    half_model.load_state_dict(model.state_dict())
    half_model.convert_to_fp16()
    assert half_model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert half_model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # norms stay fp32
    assert half_model.time_embed[0].weight.dtype == torch.float32
    assert half_model.out[2].weight.dtype == torch.float32
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        full = model(x, t)
        half = half_model(x, t)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() / full.abs().max() < 2e-2


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for use_checkpoint in (False, True):
        model, _ = small_model(use_checkpoint=use_checkpoint)
        assert all(b.use_checkpoint == use_checkpoint for b in attention_blocks(model).values())
        torch.manual_seed(3)
        x = torch.randn(2, 3, 32, 32)
        model(x, torch.tensor([5, 50])).square().mean().backward()
        grads.append(model.input_blocks[1][0].in_layers[2].weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_inputs_name_what_was_expected():
    model, _ = small_model()
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.randn(2, 3, 30, 30), t)  # sides must halve cleanly at every level (64 works, as upstream)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 3, 32, 32), t, y=torch.tensor([1, 2]))
    cond, _ = small_model(class_cond=True)
    with pytest.raises(ValueError, match="needs labels"):
        cond(torch.randn(2, 3, 32, 32), t)
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        cond(torch.randn(2, 3, 32, 32), t, y=torch.tensor([1, 1000]))
    with pytest.raises(ValueError, match="one timestep per image"):
        cond(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]), y=torch.tensor([1, 2]))


def test_superres_model_stacks_low_res_and_checks_inputs():
    args = su.sr_model_and_diffusion_defaults()
    args.update(large_size=64, small_size=32, num_channels=32, num_res_blocks=1, num_head_channels=16,
                attention_resolutions="8")
    model, _ = su.sr_create_model_and_diffusion(**args)
    assert model.input_blocks[0][0].weight.shape[1] == 6
    out = model(torch.randn(1, 3, 64, 64), torch.tensor([3]), low_res=torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="low_res"):
        model(torch.randn(1, 3, 64, 64), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"\(N, 3, 64, 64\)"):
        model(torch.randn(1, 3, 36, 36), torch.tensor([3]), low_res=torch.randn(1, 3, 32, 32))


def test_classifier_forward_shape():
    args = su.classifier_defaults()
    args.update(image_size=64, classifier_width=64, classifier_depth=1)
    classifier = su.create_classifier(**args)
    logits = classifier(torch.randn(2, 3, 64, 64), torch.tensor([3, 4]))
    assert logits.shape == (2, 1000)
    with pytest.raises(ValueError, match="classifier expects"):
        classifier(torch.randn(2, 3, 32, 32), torch.tensor([3, 4]))


# --- checkpoint loading errors ------------------------------------------------------------------


def test_loading_wrong_flags_explains_in_flag_terms(adm_checkpoints):
    ref = adm_checkpoints["256x256_diffusion"]
    ckpt = {k: torch.empty(v, device="meta") for k, v in ref["state_dict"].items()}
    flags = dict(ref["flags"], class_cond=False)
    model = build_from_entry("256x256_diffusion", flags)
    with pytest.raises(CheckpointError, match=r"class_cond=True") as err:
        load_checkpoint(model, ckpt)
    assert "1 unexpected keys, e.g. label_emb.weight" in str(err.value)

    model = build_from_entry("256x256_diffusion", dict(ref["flags"], num_channels=192))
    with pytest.raises(CheckpointError, match="num_channels looks like 256 in the checkpoint, not 192"):
        load_checkpoint(model, ckpt)

    model = build_from_entry("256x256_diffusion", dict(ref["flags"], learn_sigma=False))
    with pytest.raises(CheckpointError, match="learn_sigma=True"):
        load_checkpoint(model, ckpt)

    model = build_from_entry("256x256_diffusion", dict(ref["flags"], attention_resolutions="16,8"))
    with pytest.raises(CheckpointError, match="attention_resolutions") as err:
        load_checkpoint(model, ckpt)
    assert "unexpected keys, e.g. input_blocks.10.1" in str(err.value)


def test_truncated_and_foreign_files_get_clear_errors(tmp_path, pag_reference):
    good = tmp_path / "model.pt"
    torch.save(pag_reference["state_dict"], good)
    assert set(read_state_dict(good)) == set(pag_reference["state_dict"])
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(text)
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(CheckpointError, match="state dict"):
        read_state_dict(not_tensors)
    with pytest.raises(FileNotFoundError, match="make download-models"):
        read_state_dict(tmp_path / "missing.pt")


def test_mapped_read_gives_the_same_tensors_and_errors(tmp_path, pag_reference):
    good = tmp_path / "model.pt"
    torch.save({"state_dict": pag_reference["state_dict"]}, good)
    mapped = read_state_dict(good, mmap=True)
    assert set(mapped) == set(pag_reference["state_dict"])
    assert all(torch.equal(mapped[k], v) for k, v in pag_reference["state_dict"].items())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"\(5000 bytes\) is not a readable PyTorch checkpoint"):
        read_state_dict(truncated, mmap=True)
    with pytest.raises(FileNotFoundError, match="make download-models"):
        read_state_dict(tmp_path / "missing.pt", mmap=True)
