"""Train the embedded demo's models on a generated data set (demo/data.py) into --out_dir (checkpoints/demo): the
tiny ADM U-Net (<model>.pt: EMA weights, float32; <model>.yaml: its flags as configs/models/*.yaml) by upstream's
TrainLoop with this script's learning-rate schedule, EMA warm-up and per-step callback (--init_from continues from a
saved <model>.pt), and its feature network (demo/features.py); then TRAINING.md, the record, and with
--check_samples N, DDIM-25 samples, unguided (left) and PAG (right), from the same noise.

    python scripts/train_demo.py --what all --check_samples 64   # what `make train-demo` runs
    python scripts/train_demo.py --what diffusion --steps 2 --out_dir /tmp/demo   # a smoke run

Threads: on a 2-core machine shared with other jobs one thread was up to ~4x faster than two, on an idle one two
were ~1.7x faster: --threads 0 (the default) re-measures both every 200 diffusion steps (ThreadChooser).
"""

import argparse
import functools
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch as th
import yaml

from adm_common.files import atomic_write_text
from guided_diffusion import dist_util, logger
from guided_diffusion.checkpoint import load_checkpoint
from guided_diffusion.script_util import create_model_from_flags
from guided_diffusion.train_util import TrainLoop, save_checkpoint_file
from sampling import images as sample_images
from sampling.model_configs import load_model_config

from . import data as demo_data
from . import features as demo_features

DATASETS = demo_data.DATASETS  # per data set: the model, its feature net and their training choices
# Upstream flag names; every flag not listed keeps model_and_diffusion_defaults().
# channel_mult starts at 2 so the 32x32 level has 64 channels: the output GroupNorm has 32 groups, and with 32
# channels it is a per-channel instance norm that removes each channel's spatial mean (the image's colour).
DEMO_FLAGS = dict(image_size=32, class_cond=True, learn_sigma=True, num_channels=32, num_res_blocks=1,
                  channel_mult="2,2,2", attention_resolutions="16,8", num_head_channels=32, use_scale_shift_norm=True,
                  resblock_updown=True, dropout=0.0, diffusion_steps=1000, noise_schedule="linear")
FEATURES_HELD_OUT_SEED_OFFSET = 1000  # held-out images: make_dataset(n, seed + 1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=("diffusion", "features", "all"), default="all")
    p.add_argument("--dataset", choices=tuple(DATASETS), default="shapes",
                   help="shapes: the class-conditional demo model; mirror: the unconditional one (demo/data.py)")
    p.add_argument("--out_dir", default="checkpoints/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: pick 1 or 2 by measuring")
    p.add_argument("--num_images", type=int, default=30000, help="training set size (both models)")
    # diffusion
    p.add_argument("--steps", type=int, default=1500, help="diffusion training steps")
    p.add_argument("--batch_size", type=int, default=32, help="diffusion batch size")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=100)
    p.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="after warm-up: constant, or cosine decay to 0 at --steps")
    p.add_argument("--ema_rate", type=float, default=0.999)
    p.add_argument("--init_from", default="", help="start from these U-Net weights (an adm_demo.pt)")
    p.add_argument("--max_minutes", type=float, default=0.0,
                   help="stop diffusion training after this many minutes (0: no limit); the record "
                        "states the steps actually run")
    # features
    p.add_argument("--feature_steps", type=int, default=600)
    p.add_argument("--feature_batch_size", type=int, default=128)
    p.add_argument("--feature_lr", type=float, default=2e-3)
    p.add_argument("--held_out", type=int, default=5000, help="held-out images for the feature net's accuracy")
    p.add_argument("--check_samples", type=int, default=0,
                   help="after training, write samples_check.png with this many DDIM-25 samples per side")
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--overwrite", action="store_true",
                   help="replace checkpoints already in --out_dir (otherwise they are refused before training)")
    return p.parse_args(argv)


def model_flags(dataset):
    """The demo U-Net's upstream flags for data set ``dataset``: DEMO_FLAGS, conditional or not."""
    return {**DEMO_FLAGS, "class_cond": DATASETS[dataset].class_cond}


def check_name(dataset):
    """The sample check's file: samples_check.png for the shapes model, samples_check_<model>.png otherwise."""
    return "samples_check.png" if dataset == "shapes" else f"samples_check_{DATASETS[dataset].model}.png"


def files_written(args):
    """The checkpoint files this run writes into --out_dir (TRAINING.md is updated, not replaced)."""
    spec, names = DATASETS[args.dataset], []
    if args.what in ("diffusion", "all"):
        names += [f"{spec.model}.pt", f"{spec.model}.yaml", *([check_name(args.dataset)] if args.check_samples else [])]
    if args.what in ("features", "all"):
        names.append(spec.features)
    return names


log = functools.partial(print, flush=True)


def ema_rate_at(step, rate):
    """EMA decay with warm-up: min(rate, (1 + n) / (10 + n)) after n updates, so early weights fade fast."""
    return min(rate, (1.0 + step) / (10.0 + step))


def lr_at(step, args):
    """Linear warm-up over --warmup_steps, then constant or cosine decay to 0 at --steps."""
    lr = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
    if args.lr_schedule == "cosine" and step >= args.warmup_steps:
        frac = (step - args.warmup_steps) / max(args.steps - args.warmup_steps, 1)
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))
    return lr


class ThreadChooser:
    """With ``threads`` 0, time ``probe`` steps with 1 and then with 2 threads every ``period`` steps and use
    the faster (a 2-thread step slower than 1.5x the 1-thread median ends the probe early: on oversubscribed
    cores it can be several times slower); otherwise always ``threads``."""

    def __init__(self, threads, period=200, probe=6):
        self.fixed, self.period, self.probe = threads, period, probe
        self.current = threads or 1
        self.times = {}
        self.probing = False
        self.used = set()

    def before_step(self, step):
        if not self.fixed:
            phase = step % self.period
            if phase == 0:
                self.times, self.probing = {}, True
            if self.probing:
                two_is_slow = 2 in self.times and max(self.times[2]) > 1.5 * np.median(self.times[1])
                if phase < self.probe:
                    self.current = 1
                elif phase < 2 * self.probe and not two_is_slow:
                    self.current = 2
                else:
                    self.current = min(self.times, key=lambda n: np.median(self.times[n]))
                    self.probing = False
        th.set_num_threads(self.current)
        self.used.add(self.current)

    def after_step(self, step, seconds):
        if not self.fixed and self.probing:
            self.times.setdefault(self.current, []).append(seconds)


def demo_batches(images, labels, batch_size, seed):
    """TrainLoop's data: endless (images, {"y": labels}) batches drawn with replacement (numpy ``seed``);
    ``labels`` None: (images, {}) for an unconditional model."""
    rng = np.random.default_rng(seed)
    data = demo_features.images_to_tensor(images)
    targets = None if labels is None else th.as_tensor(labels, dtype=th.long)
    while True:
        idx = th.from_numpy(rng.integers(0, data.shape[0], size=batch_size))
        yield data[idx], ({} if labels is None else {"y": targets[idx]})


class LossHistory(logger.KVWriter):
    """A logger output that keeps each table's loss terms: with log_interval 1, TrainLoop's per-step losses
    (each the batch mean, weighted by the timestep sampler's weights)."""

    def __init__(self):
        self.values = {key: [] for key in ("loss", "mse", "vb")}

    def writekvs(self, kvs):
        for key, values in self.values.items():
            values.append(float(kvs[key]))

    def recent(self, n):
        return {key: float(np.mean(values[-n:])) if values else float("nan") for key, values in self.values.items()}


def train_diffusion(args, images, labels):
    # A continued run (--init_from) draws other batches, timesteps and noise than the run it continues.
    train_seed = args.seed if not args.init_from else [args.seed, 1]
    th.manual_seed(args.seed if not args.init_from else args.seed * 1000 + 1)
    np.random.seed(train_seed)  # the UniformSampler draws timesteps from numpy's global generator
    model, diffusion = create_model_from_flags("diffusion", model_flags(args.dataset))
    if args.init_from:
        load_checkpoint(model, args.init_from)
        log(f"diffusion: starting from {args.init_from}")
    device = dist_util.dev()
    model.to(device).train()
    threads = ThreadChooser(args.threads)
    history = LossHistory()
    clock = {}  # when training and the current step started

    def after_step(loop):
        """TrainLoop's step callback: time the step for the thread chooser, print progress, stop at
        --max_minutes, and set the threads of the next step."""
        done, now = loop.step, time.time()
        start = clock["training"]
        threads.after_step(done - 1, now - clock["step"])
        if args.log_every and done % args.log_every == 0:
            recent = history.recent(args.log_every)
            log(f"diffusion step {done}/{args.steps} loss {recent['loss']:.4f} mse {recent['mse']:.4f} "
                f"vb {recent['vb']:.4f} ({done / (now - start):.2f} steps/s, {threads.current} thread(s))")
        if args.max_minutes and now - start > args.max_minutes * 60 and done < args.steps:
            log(f"diffusion: --max_minutes {args.max_minutes} reached after {done} steps")
            return True
        threads.before_step(done)
        clock["step"] = time.time()
        return False

    with tempfile.TemporaryDirectory(prefix="adm_demo_trainloop-") as run_dir, \
            logger.scoped_configure(dir=run_dir, format_strs=[]) as run_logger:
        run_logger.output_formats.append(history)
        data = demo_batches(images, labels if DATASETS[args.dataset].class_cond else None, args.batch_size, train_seed)
        loop = TrainLoop(
            model=model, diffusion=diffusion, data=data, batch_size=args.batch_size, microbatch=-1, lr=args.lr,
            ema_rate=str(args.ema_rate), log_interval=1, save_interval=args.steps, resume_checkpoint="",
            weight_decay=0.0, lr_anneal_steps=args.steps, lr_schedule=lambda step: lr_at(step, args),
            ema_schedule=ema_rate_at, step_callback=after_step,
        )
        threads.before_step(0)
        clock["training"] = clock["step"] = time.time()
        loop.run_loop()
        elapsed = time.time() - clock["training"]
        model.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    model.cpu().eval()
    steps_run = loop.step
    tail = max(1, min(100, steps_run))
    return model, diffusion, {"steps": steps_run, "seconds": elapsed, "final": history.recent(tail), "tail": tail,
                              "threads": sorted(threads.used), "device": device,
                              "params": sum(p.numel() for p in model.parameters())}


def save_diffusion(model, out_dir, dataset="shapes"):
    name = DATASETS[dataset].model
    path = out_dir / f"{name}.pt"
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_checkpoint_file(state, path)
    config = {"name": name, "kind": "diffusion", "file": path.name, "flags": model_flags(dataset)}
    header = (f"# The embedded demo's tiny ADM model, trained by scripts/train_demo.py on demo/data.py's {dataset!r}\n"
              "# data set (see TRAINING.md). flags: upstream flag names; every flag not listed keeps its upstream "
              "default.\n")
    if DATASETS[dataset].class_cond:
        # The U-Net keeps upstream's 1000-row label embedding; only labels 0..9 (the shapes) were trained.
        config.update(num_classes=demo_data.NUM_CLASSES, class_names=list(demo_data.CLASS_NAMES))
        header += ("# Sample labels in [0, num_classes): label_emb has upstream's 1000 rows, only the first 10 "
                   "are trained.\n")
    atomic_write_text(out_dir / f"{name}.yaml", header + yaml.safe_dump(config, sort_keys=False))
    # Check the files load back strictly into the model the YAML describes.
    rebuilt, _ = create_model_from_flags("diffusion", load_model_config(out_dir / f"{name}.yaml")["flags"])
    load_checkpoint(rebuilt, str(path))
    return path


def feature_data(dataset, images, labels, seed):
    """The feature net's images and labels: those of the data set; for the mirror set a fifth as many again of
    its "broken" class (demo.data.make_broken_mirror, with ``seed``), so the features see whether halves agree."""
    if dataset != "mirror":
        return images, labels
    broken = [demo_data.make_broken_mirror(seed, i) for i in range(max(len(labels) // 5, 1))]
    return (np.concatenate([images, np.stack([image for image, _ in broken])]),
            np.concatenate([labels, np.array([label for _, label in broken], dtype=np.int64)]))


def train_features(args, images, labels):
    spec = DATASETS[args.dataset]
    images, labels = feature_data(args.dataset, images, labels, args.seed)
    start = time.time()
    net, final_loss = demo_features.train_feature_net(
        images, labels, steps=args.feature_steps, batch_size=args.feature_batch_size, lr=args.feature_lr,
        seed=args.seed, num_classes=spec.feature_classes, log_every=args.log_every * 4, log=log,
        rotations=spec.rotations,
    )
    elapsed = time.time() - start
    held_seed = args.seed + FEATURES_HELD_OUT_SEED_OFFSET
    held_images, held_labels = feature_data(args.dataset, *demo_data.make_dataset(args.held_out, held_seed,
                                                                                  kind=args.dataset), held_seed)
    acc = demo_features.accuracy(net, held_images, held_labels)
    log(f"features: held-out accuracy {acc:.4f} on {len(held_labels)} images ({elapsed:.0f} s)")
    return net, {"steps": args.feature_steps, "seconds": elapsed, "final_loss": final_loss,
                 "held_out_accuracy": acc, "held_out_images": len(held_labels), "threads": th.get_num_threads(),
                 "params": sum(p.numel() for p in net.parameters())}


def check_samples(model, n, seed, out_dir, dataset="shapes"):
    """DDIM-25 samples (a conditional model's labels cycling over the classes): unguided | PAG (same x_T),
    saved side by side."""
    import pag

    _, diffusion = create_model_from_flags("diffusion", {**model_flags(dataset), "timestep_respacing": "ddim25"})
    noise = th.randn(n, 3, 32, 32, generator=th.Generator().manual_seed(seed))
    kwargs = {"y": th.arange(n) % demo_data.NUM_CLASSES} if DATASETS[dataset].class_cond else {}
    grids = []
    for scale in (0.0, 3.0):  # PAG at the 8x8 encoder and middle attention blocks
        config = pag.GuidanceConfig(pag_scale=scale, pag_layers=["input_blocks.5.1", "middle_block.1"])
        x = diffusion.ddim_sample_loop(pag.guide(model, config), (n, 3, 32, 32), noise=noise.clone(),
                                       model_kwargs=kwargs)
        grids.append(sample_images.to_uint8_nhwc(x))
    path = out_dir / check_name(dataset)
    sample_images.save_side_by_side(grids[0], grids[1], path, gap=8)
    return path


def _section(text, heading):
    """The ``## heading...`` section of a record (up to the next ``## ``, ending in one blank line), or None."""
    start = text.find(heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return (text[start:] if end < 0 else text[start:end + 1]).rstrip("\n") + "\n"


def _run_lines(args, argv, data_seconds, threads, device=None):
    cuda = device is not None and device.type == "cuda"
    where = f"GPU ({th.cuda.get_device_name(device)})" if cuda else f"{platform.machine()} CPU"
    return [
        f"- command: `python scripts/train_demo.py {' '.join(argv)}`",
        f"- torch {th.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
        f"{where}, {'/'.join(str(t) for t in threads)} thread(s)",
        f"- data: `demo.data.make_dataset({args.num_images}, seed={args.seed}, kind={args.dataset!r})`: "
        f"{args.num_images} generated 32x32 images ({demo_data.NUM_CLASSES} shape classes), "
        f"generated in {data_seconds:.0f} s; seed {args.seed} for torch, numpy and the data",
    ]


def write_record(args, out_dir, data_seconds, diffusion_info, feature_info, argv, previous=""):
    """Write TRAINING.md; ``previous`` is the record before this run (sections not retrained are kept, the
    other data sets' too)."""
    spec, flags = DATASETS[args.dataset], model_flags(args.dataset)
    lines = [
        "# Demo checkpoints: how they were trained",
        "",
        "Written by `scripts/train_demo.py` (`make train-demo` rebuilds the shapes model; `make train-demo-mirror` "
        "trains a mirror model from scratch, not the committed two-stage one). "
        f"Data sets: `demo/data.py`, {demo_data.NUM_CLASSES} shape classes "
        f"({', '.join(demo_data.CLASS_NAMES)}); `shapes` (class-conditional model) and `mirror` (unconditional "
        "model: a fine colour texture over the left half, the right half the left half's mirror image).",
        "",
    ]
    for dataset, names in DATASETS.items():  # every data set's two sections, this run's rewritten
        diffusion_title = f"## Diffusion model ({names.model}.pt, {names.model}.yaml)"
        features_title = f"## Feature network ({names.features})"
        d = diffusion_info if dataset == args.dataset else None
        f = feature_info if dataset == args.dataset else None
        if not d:
            lines.append(_section(previous, diffusion_title))
        else:
            lines += [diffusion_title, ""] + _run_lines(args, argv, data_seconds, d["threads"], d.get("device")) + [
                f"- architecture (upstream flags): {', '.join(f'{k}={v}' for k, v in flags.items())}",
                f"- parameters: {d['params']:,} ({d['bytes'] / 1e6:.2f} MB as float32)",
                f"- objective: upstream hybrid loss ({'x_0' if flags.get('predict_xstart') else 'eps'} MSE + VB "
                "term for the learned variance), uniform timestep sampler",
                f"- optimiser: AdamW, lr {args.lr} (linear warm-up over {args.warmup_steps} steps, then "
                f"{'cosine decay to 0' if args.lr_schedule == 'cosine' else 'constant'}), weight decay 0, "
                f"batch {args.batch_size}; training loop `guided_diffusion.train_util.TrainLoop`",
            ]
            if args.init_from:
                lines.append(f"- started from `{args.init_from}` (continued training, fresh optimiser; the run that "
                             "wrote it is recorded under 'Earlier stage' below)")
            lines += [
                f"- steps: {d['steps']} (requested {args.steps}), {d['steps'] * args.batch_size} images seen, "
                f"{d['seconds'] / 60:.1f} min ({d['steps'] / max(d['seconds'], 1e-9):.2f} steps/s)",
                f"- final losses (mean of the last {d['tail']} steps): loss {d['final']['loss']:.4f}, "
                f"mse {d['final']['mse']:.4f}, vb {d['final']['vb']:.4f}",
                f"- saved weights: EMA, rate {args.ema_rate} with warm-up min(rate, (1 + n) / (10 + n)); float32",
                "",
            ]
            if args.init_from:  # the run that wrote --init_from, from its record
                init_record = Path(args.init_from).parent / "TRAINING.md"
                same = init_record.resolve() == (out_dir / "TRAINING.md").resolve()
                earlier = _section(previous if same else (init_record.read_text() if init_record.exists() else ""),
                                   diffusion_title)
                if earlier:
                    earlier = earlier.replace("\n### ", "\n#### ").replace(diffusion_title, "### Earlier stage", 1)
                    lines.append(earlier.rstrip() + "\n")
        if not f:
            lines.append(_section(previous, features_title))
        else:
            broken = ("; plus a fifth as many images of a \"broken\" class (the halves of two different images, "
                      "`demo.data.make_broken_mirror`)" if args.dataset == "mirror" else "")
            lines += [features_title, ""] + _run_lines(args, argv, data_seconds, [f["threads"]]) + [
                "- `demo.features.DemoFeatureNet`: 4 conv blocks -> 128-d pooled features -> "
                f"{spec.feature_classes} logits ({f['params']:,} parameters){broken}",
                f"- training: cross-entropy, Adam one-cycle lr {args.feature_lr}, batch {args.feature_batch_size}, "
                f"{f['steps']} steps, {'90-degree rotations and flips' if spec.rotations else 'flips'}; "
                f"{f['seconds'] / 60:.1f} min; final loss {f['final_loss']:.4f}",
                f"- held-out accuracy: {f['held_out_accuracy']:.4f} on {f['held_out_images']} images "
                f"(`make_dataset({args.held_out}, seed={args.seed + FEATURES_HELD_OUT_SEED_OFFSET}, "
                f"kind={args.dataset!r})`{' and its broken class' if args.dataset == 'mirror' else ''})",
                "- its features give the demo's demo-feature FID / precision / recall / classifier score; "
                "these are not Inception metrics",
                "",
            ]
    path = out_dir / "TRAINING.md"
    atomic_write_text(path, "\n".join(line for line in lines if line is not None).rstrip() + "\n")
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.what in ("diffusion", "all") and args.steps < 1:
        raise SystemExit("error: --steps must be at least 1")
    th.set_num_threads(args.threads or 1)
    out_dir = Path(args.out_dir)
    existing = [name for name in files_written(args) if (out_dir / name).exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"error: {out_dir} already holds {', '.join(existing)}: pass --overwrite to replace them "
                         "(make train-demo TRAIN_DEMO_FLAGS=--overwrite), or choose another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path = out_dir / "TRAINING.md"
    previous = record_path.read_text() if record_path.exists() else ""

    start = time.time()
    images, labels = demo_data.make_dataset(args.num_images, args.seed, kind=args.dataset)
    data_seconds = time.time() - start
    log(f"data: {args.num_images} images in {data_seconds:.1f} s")

    diffusion_info = feature_info = None
    if args.what in ("features", "all"):
        net, feature_info = train_features(args, images, labels)
        features_path = out_dir / DATASETS[args.dataset].features
        demo_features.save_demo_feature_net(net, features_path, held_out_accuracy=feature_info["held_out_accuracy"])
        demo_features.load_demo_feature_net(features_path)
    if args.what in ("diffusion", "all"):
        model, _, diffusion_info = train_diffusion(args, images, labels)
        path = save_diffusion(model, out_dir, args.dataset)
        diffusion_info["bytes"] = os.path.getsize(path)
        log(f"diffusion: {diffusion_info['steps']} steps in {diffusion_info['seconds'] / 60:.1f} min, "
            f"final loss {diffusion_info['final']['loss']:.4f}; wrote {path}")
        if args.check_samples:
            log(f"sample check: {check_samples(model, args.check_samples, args.seed, out_dir, args.dataset)}")
    record = write_record(args, out_dir, data_seconds, diffusion_info, feature_info, argv, previous)
    log(f"wrote {record}")


