"""Upstream's training stack: load_data, TrainLoop (checkpoints, resumption, fp16 master weights, DDP),
the nn / fp16_util helpers, and upstream's scripts (image_train, super_res_train, classifier_train,
image_nll) run as commands on a tiny generated PNG folder."""

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import fp16_util, logger, nn as gnn
from guided_diffusion import script_util as su
from guided_diffusion.image_datasets import load_data
from guided_diffusion.resample import UniformSampler
from guided_diffusion.train_util import (TrainLoop, parse_resume_step_from_filename, save_checkpoint_file,
                                         training_defaults)
from processes import clean_env, free_port, run_together

ROOT = Path(__file__).resolve().parents[1]
# A tiny class-conditional 16x16 U-Net (upstream's flag names).
MODEL_FLAGS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
                   num_head_channels=16, class_cond=True, diffusion_steps=100)


def flag_args(flags):
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def script_env(logdir, **extra):
    """A launcher-free environment for upstream-style scripts logging into ``logdir``."""
    env = clean_env(OPENAI_LOGDIR=logdir, OPENAI_LOG_FORMAT="stdout,log,csv", **extra)
    env.pop("DIFFUSION_TRAINING_TEST", None)  # upstream's early-stop switch
    return env


def run_script(script, flags, logdir, extra_env=None, timeout=240):
    env = script_env(logdir, **(extra_env or {}))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *flag_args(flags)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def make_image_folder(root, per_class=4, size=24):
    """PNGs named {class}_{i}.png (class = colour), half of them in a sub-folder, plus a non-image file."""
    rng = np.random.default_rng(0)
    colours = {"blue": (40, 40, 220), "red": (220, 40, 40)}
    (root / "more").mkdir(parents=True)
    for name, colour in colours.items():
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            folder = root / "more" if i % 2 else root
            Image.fromarray(arr).save(folder / f"{name}_{i:03d}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


def build(flags=MODEL_FLAGS, **overrides):
    args = su.model_and_diffusion_defaults()
    args.update(flags)
    args.update(overrides)
    return su.create_model_and_diffusion(**args)


def eval_loss(model, diffusion, folder):
    """The training loss on all eight images with fixed timesteps and noise."""
    x, cond = next(load_data(data_dir=str(folder), batch_size=8, image_size=16, class_cond=True,
                             deterministic=True, random_flip=False))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    t = torch.arange(8) * 12
    with torch.no_grad():
        return diffusion.training_losses(model, x, t, model_kwargs=cond, noise=noise)["loss"].mean().item()


# --- load_data ---------------------------------------------------------------------------------------------


def test_load_data_labels_from_file_names(image_folder):
    data = load_data(data_dir=str(image_folder), batch_size=8, image_size=16, class_cond=True,
                     deterministic=True, random_flip=False)
    x, cond = next(data)
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    # Sorted paths: blue_000, blue_002, more/{blue_001, blue_003, red_001, red_003}, red_000, red_002.
    assert cond["y"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert (x[cond["y"] == 0, 2].mean() > 0.5) and (x[cond["y"] == 1, 0].mean() > 0.5)  # blue / red channel
    x2, _ = next(data)  # the next epoch, same order
    assert torch.equal(x, x2)
    unlabelled = next(load_data(data_dir=str(image_folder), batch_size=2, image_size=8))
    assert unlabelled[0].shape == (2, 3, 8, 8) and unlabelled[1] == {}
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(load_data(data_dir=str(image_folder), batch_size=9, image_size=16))


# --- the upstream-style command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("run")
    flags = dict(MODEL_FLAGS, data_dir=image_folder, lr=1e-3, batch_size=4, lr_anneal_steps=12,
                 save_interval=6, log_interval=6, ema_rate="0.9,0.99")
    stdout = run_script("image_train.py", flags, logdir)
    return logdir, stdout


def test_image_train_writes_checkpoints_and_the_loss_decreases(trained_run, image_folder):
    logdir, stdout = trained_run
    names = {p.name for p in logdir.iterdir()}
    for step in (6, 12):
        assert {f"model{step:06d}.pt", f"ema_0.9_{step:06d}.pt", f"ema_0.99_{step:06d}.pt",
                f"opt{step:06d}.pt"} <= names
    assert "step 12: loss" in stdout and "samples/s" in stdout
    rows = list(csv.DictReader(open(logdir / "progress.csv")))
    assert [int(r["samples"]) for r in rows] == [24, 48]  # (step + 1) * batch at the two dumps
    model, diffusion = build()
    initial = eval_loss(model, diffusion, image_folder)  # upstream zero-initialises the output: eps = 0
    losses = []
    for step in (6, 12):
        model.load_state_dict(torch.load(logdir / f"model{step:06d}.pt", weights_only=True))
        losses.append(eval_loss(model, diffusion, image_folder))
    assert losses[0] < 0.95 * initial
    assert losses[1] < losses[0] and losses[1] < 0.85 * initial
    ema = torch.load(logdir / "ema_0.9_000012.pt", weights_only=True)
    assert set(ema) == set(model.state_dict())


def test_image_nll_prints_bits_per_dim(trained_run, image_folder, tmp_path):
    logdir, _ = trained_run
    flags = dict(MODEL_FLAGS, data_dir=image_folder, model_path=logdir / "model000012.pt", num_samples=2,
                 batch_size=2)
    stdout = run_script("image_nll.py", flags, tmp_path)
    bpd = float(stdout.split("done 2 samples: bpd=")[1].split()[0])
    assert 0 < bpd < 50
    vb = np.load(tmp_path / "vb_terms.npz")["arr_0"]
    assert vb.shape == (100,) and np.isfinite(vb).all()


def test_super_res_and_classifier_training_commands(image_folder, tmp_path):
    sr = dict(data_dir=image_folder, large_size=64, small_size=32, num_channels=32, num_res_blocks=1,
              num_head_channels=16, attention_resolutions="8", diffusion_steps=50, batch_size=2,
              lr_anneal_steps=2, save_interval=2)
    run_script("super_res_train.py", sr, tmp_path / "sr")
    assert {"model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt"} <= set(os.listdir(tmp_path / "sr"))
    classifier = dict(data_dir=image_folder, val_data_dir=image_folder, image_size=64, classifier_width=32,
                      classifier_depth=1, classifier_attention_resolutions="8", iterations=2, batch_size=4,
                      microbatch=2, log_interval=1, eval_interval=1, diffusion_steps=50)
    stdout = run_script("classifier_train.py", classifier, tmp_path / "cls")
    assert {"model000001.pt", "opt000001.pt"} <= set(os.listdir(tmp_path / "cls"))
    assert "train_acc@1" in stdout and "val_loss" in stdout
    # Resumed at or past --iterations: nothing to train, the state is saved under the step it resumed at.
    run_script("classifier_train.py", dict(classifier, iterations=1, resume_checkpoint=tmp_path / "cls" /
                                           "model000001.pt"), tmp_path / "cls_resumed")
    assert {"model000001.pt", "opt000001.pt"} <= set(os.listdir(tmp_path / "cls_resumed"))


def test_two_process_training_torchrun_style(image_folder, tmp_path):
    flags = dict(MODEL_FLAGS, data_dir=image_folder, batch_size=2, microbatch=1, lr_anneal_steps=2,
                 save_interval=2, log_interval=1)
    env = script_env(tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), WORLD_SIZE=2)
    command = [sys.executable, str(ROOT / "scripts" / "image_train.py"), *flag_args(flags)]
    results = run_together([command] * 2, [dict(env, RANK=str(r), LOCAL_RANK=str(r)) for r in range(2)], 240)
    for code, text in results:
        assert code == 0, text
    rows = list(csv.DictReader(open(tmp_path / "progress.csv")))
    assert [int(r["samples"]) for r in rows] == [4, 8]  # global batch 2 x 2 processes
    assert {"model000002.pt", "ema_0.9999_000002.pt", "opt000002.pt"} <= set(os.listdir(tmp_path))
    assert "samples/s" in results[0][1] and "samples/s" not in results[1][1]  # only rank 0 logs


# --- TrainLoop in process: resumption and fp16 ---------------------------------------------------------


def seeded(data, start):
    """``data`` with the global RNGs reseeded per step, so timesteps and noise depend on the step only."""
    for step, batch in enumerate(data, start):
        torch.manual_seed(step)
        np.random.seed(step)
        yield batch


def train(folder, logdir, steps, resume_checkpoint="", start=0, interrupt=False, **overrides):
    torch.manual_seed(123)
    model, diffusion = build(**overrides)
    data = load_data(data_dir=str(folder), batch_size=4, image_size=16, class_cond=True, deterministic=True,
                     random_flip=False)
    logger.configure(dir=str(logdir), format_strs=["log"])
    try:
        loop = TrainLoop(model=model, diffusion=diffusion, data=seeded(data, start), batch_size=4, microbatch=2,
                         lr=2e-3, ema_rate="0.9,0.99", log_interval=1, save_interval=2,
                         resume_checkpoint=str(resume_checkpoint), lr_anneal_steps=steps,
                         use_fp16=overrides.get("use_fp16", False))
        if interrupt:
            os.environ["DIFFUSION_TRAINING_TEST"] = "1"  # upstream's switch: stop after the first save
        loop.run_loop()
    finally:
        os.environ.pop("DIFFUSION_TRAINING_TEST", None)
        logger.reset()
    return loop


def load(path):
    return torch.load(path, weights_only=True)


def test_resuming_reaches_the_same_parameters_as_an_uninterrupted_run(image_folder, tmp_path):
    train(image_folder, tmp_path / "straight", steps=4)  # uninterrupted
    first = train(image_folder, tmp_path / "first", steps=4, interrupt=True)
    assert first.step == 2 and not (tmp_path / "first" / "model000004.pt").exists()
    resumed = train(image_folder, tmp_path / "resumed", steps=4, start=2,
                    resume_checkpoint=tmp_path / "first" / "model000002.pt")
    assert resumed.resume_step == 2 and resumed.step == 2
    for name in ("model000004.pt", "ema_0.9_000004.pt", "ema_0.99_000004.pt"):
        a, b = load(tmp_path / "straight" / name), load(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a), name
    # The run really moved, and the EMA lags behind the model.
    before, after = load(tmp_path / "first" / "model000002.pt"), load(tmp_path / "straight" / "model000004.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ema = load(tmp_path / "straight" / "ema_0.9_000004.pt")
    assert any(not torch.equal(ema[k], after[k]) for k in ema)
    opt_a, opt_b = load(tmp_path / "straight" / "opt000004.pt"), load(tmp_path / "resumed" / "opt000004.pt")
    assert opt_a["param_groups"][0]["lr"] == opt_b["param_groups"][0]["lr"]
    assert all(torch.allclose(opt_a["state"][i]["exp_avg_sq"], opt_b["state"][i]["exp_avg_sq"], atol=1e-9)
               for i in opt_a["state"])
    assert parse_resume_step_from_filename("/runs/a/model012345.pt") == 12345
    assert parse_resume_step_from_filename("/runs/a/weights.pt") == 0


def test_lr_schedule_ema_schedule_and_step_callback(image_folder, tmp_path):
    """TrainLoop's extension points: the schedule sets each step's lr before it, the EMA decays come from
    ema_schedule, and a callback that returns True ends the run with the last checkpoint saved."""
    torch.manual_seed(0)
    model, diffusion = build()
    data = load_data(data_dir=str(image_folder), batch_size=2, image_size=16, class_cond=True, deterministic=True,
                     random_flip=False)
    lr_calls, ema_calls, seen = [], [], []

    def lr_schedule(step):
        lr_calls.append(step)
        return 1e-3 * (step + 1)

    def ema_schedule(step, rate):
        ema_calls.append((step, rate))
        return 0.0  # the EMA follows the model exactly

    def callback(loop):
        seen.append((loop.step, loop.opt.param_groups[0]["lr"]))
        return loop.step == 2

    logger.configure(dir=str(tmp_path), format_strs=["log"])
    try:
        loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=2, microbatch=-1, lr=1.0,
                         ema_rate="0.9,0.99", log_interval=1, save_interval=3, resume_checkpoint="",
                         lr_anneal_steps=5, lr_schedule=lr_schedule, ema_schedule=ema_schedule,
                         step_callback=callback)
        loop.run_loop()
    finally:
        logger.reset()
    assert loop.step == 2 and lr_calls == [0, 1] and seen == [(1, 1e-3), (2, 2e-3)]
    assert ema_calls == [(0, 0.9), (0, 0.99), (1, 0.9), (1, 0.99)]
    names = set(os.listdir(tmp_path))
    assert {"model000002.pt", "ema_0.9_000002.pt", "ema_0.99_000002.pt", "opt000002.pt"} <= names
    assert not any(name.startswith(".") for name in names)  # no temporary files left by the atomic writes
    saved, ema = load(tmp_path / "model000002.pt"), load(tmp_path / "ema_0.99_000002.pt")
    assert all(torch.equal(saved[k], ema[k]) for k in saved)
    assert load(tmp_path / "opt000002.pt")["param_groups"][0]["lr"] == 2e-3


def test_from_args_takes_a_schedule_sampler_and_says_when_the_optimizer_starts_fresh(tmp_path):
    model, diffusion = build()
    torch.save(model.state_dict(), tmp_path / "model000003.pt")  # no opt000003.pt beside it
    args = argparse.Namespace(**dict(training_defaults(), resume_checkpoint=str(tmp_path / "model000003.pt")))
    sampler = UniformSampler(diffusion)
    logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    try:
        loop = TrainLoop.from_args(args, model=model, diffusion=diffusion, data=None, schedule_sampler=sampler)
    finally:
        logger.reset()
    assert loop.schedule_sampler is sampler and loop.resume_step == 3
    assert (f"no optimizer state at {tmp_path / 'opt000003.pt'}: the optimizer starts fresh"
            in (tmp_path / "log" / "log.txt").read_text())


def test_checkpoint_files_are_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "model000001.pt"
    save_checkpoint_file({"w": torch.ones(2, requires_grad=True)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint_file({"w": torch.zeros(2), "bad": lambda: None}, path)  # cannot be pickled
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model000001.pt"]
    assert torch.equal(load(path)["w"], torch.ones(2))


def test_fp16_master_weight_training_on_cpu(image_folder, tmp_path):
    loop = train(image_folder, tmp_path, steps=2, use_fp16=True)
    model, trainer = loop.model, loop.mp_trainer
    conv = model.input_blocks[1][0].in_layers[2]
    assert conv.weight.dtype == torch.float16 and model.out[2].weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.master_params) and len(trainer.master_params) == 2
    assert trainer.lg_loss_scale == pytest.approx(20.0 + 2 * 1e-3)  # two steps taken, no overflow
    saved = load(tmp_path / "model000002.pt")
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert torch.equal(saved["input_blocks.1.0.in_layers.2.weight"].half(), conv.weight)
    fresh, _ = build()
    fresh.load_state_dict(saved)  # an fp32 checkpoint: loads strictly into a float32 model
    # An overflowing step is skipped and halves the loss scale.
    before = [p.detach().clone() for p in trainer.master_params]
    trainer.zero_grad()
    (model.out[2].weight.sum() * float("inf")).backward()
    assert trainer.optimize(loop.opt) is False
    assert trainer.lg_loss_scale == pytest.approx(19.0 + 2 * 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.master_params))


# --- helpers -------------------------------------------------------------------------------------------------


def test_master_params_round_trip_and_grads():
    layer = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3))
    groups = fp16_util.get_param_groups_and_shapes(layer.named_parameters())
    assert [len(g) for g, _ in groups] == [3, 1] and [s for _, s in groups] == [-1, (1, -1)]
    master = fp16_util.make_master_params(groups)
    assert master[0].shape == (9,) and master[1].shape == (1, 54)
    layer(torch.randn(1, 2, 5, 5)).square().sum().backward()
    fp16_util.model_grads_to_master_grads(groups, master)
    assert torch.equal(master[1].grad.view(3, 2, 3, 3), layer[0].weight.grad)
    with torch.no_grad():
        for m in master:
            m.add_(1.0)
    fp16_util.master_params_to_model_params(groups, master)
    assert torch.equal(layer[0].weight.detach().reshape(-1), master[1].detach().reshape(-1))
    state = fp16_util.master_params_to_state_dict(layer, groups, master, use_fp16=True)
    assert torch.equal(state["1.bias"], master[0][6:].detach())
    back = fp16_util.state_dict_to_master_params(layer, state, use_fp16=True)
    assert all(torch.equal(a, b) for a, b in zip(back, master))
    layer[1].bias.grad = None
    assert torch.equal(fp16_util.param_grad_or_zeros(layer[1].bias), torch.zeros(3))
    fp16_util.zero_grad(layer.parameters())
    assert layer[0].weight.grad.abs().sum() == 0
    assert fp16_util.check_overflow(float("nan")) and not fp16_util.check_overflow(3.0)


def test_nn_helpers():
    target, source = [torch.ones(3)], [torch.zeros(3)]
    gnn.update_ema(target, source, rate=0.9)
    assert torch.allclose(target[0], torch.full((3,), 0.9))
    lin = gnn.scale_module(torch.nn.Linear(2, 2), 0.0)
    assert lin.weight.abs().sum() == 0
    x = torch.randn(4)
    assert torch.allclose(gnn.SiLU()(x), x * torch.sigmoid(x))
    # Gradient checkpointing: the same gradients as without it, for the inputs and the parameters.
    layer = torch.nn.Linear(3, 3)
    grads = []
    for flag in (False, True):
        inp = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        layer.zero_grad()
        out = gnn.checkpoint(lambda a: torch.tanh(layer(a)) * 2, (inp,), layer.parameters(), flag)
        out.sum().backward()
        grads.append((inp.grad.clone(), layer.weight.grad.clone()))
    assert all(torch.allclose(a, b) for a, b in zip(*grads))
