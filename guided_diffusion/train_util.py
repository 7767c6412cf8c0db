"""Upstream's diffusion training loop (``TrainLoop``), its checkpoint names and its resumption, and the start-up
the training scripts share (``script_parser``, ``start_script``).

Every ``save_interval`` steps it writes ``model{step:06d}.pt``, ``ema_{rate}_{step:06d}.pt`` per rate and
``opt{step:06d}.pt`` into ``logger.get_dir()``; ``resume_checkpoint=".../model{step:06d}.pt"`` continues from them
(the step comes from the file name). ``model{N}.pt`` holds the state after N steps (upstream's held N + 1, so a
resumed run repeated a step); docs/api.md lists the other differences from upstream.

Extension points (keyword arguments after upstream's; all optional):
    lr_schedule(step) -> lr         the learning rate of optimiser step ``step`` (0-based over the whole run, so a
                                    resumed run continues it); replaces the linear anneal (``lr_anneal_steps``
                                    then only says when to stop)
    ema_schedule(step, rate) -> d   the decay each EMA of nominal ``rate`` uses after step ``step`` (e.g. a
                                    warm-up); the files keep the nominal rate's name
    step_callback(loop) -> stop     called after each step, once its logs and checkpoints are written; a true
                                    value ends the run there, as reaching ``lr_anneal_steps`` does
"""

import argparse
import contextlib
import copy
import os
import time

import blobfile as bf
import torch as th
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim import AdamW

from adm_common.files import atomic_open
from adm_common.flags import FlagParser

from . import dist_util, logger
from .checkpoint import load_checkpoint, read_checkpoint, read_state_dict
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer  # noqa: F401 (upstream's name here too)
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler, create_named_schedule_sampler
from .script_util import add_dict_to_argparser, args_to_dict, create_model_from_flags, model_defaults


def training_defaults():
    """The training flags of ``scripts/image_train.py`` and ``super_res_train.py`` with upstream's defaults."""
    return dict(data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0, batch_size=1,
                microbatch=-1,  # -1 disables microbatches
                ema_rate="0.9999",  # comma-separated list of EMA rates
                log_interval=10, save_interval=10000, resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3)


def script_parser(doc, kind, **script_defaults):
    """A training script's flags: its own (``script_defaults``), then those of a ``kind`` model (upstream's
    defaults); ``doc``'s first paragraph is the --help description."""
    parser = FlagParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, {**script_defaults, **model_defaults(kind)})
    return parser


def start_script(parser, argv, kind):
    """Parse ``argv``, set up the processes and the logger, and build the ``kind`` network on this process's
    device: (args, model, diffusion)."""
    args = parser.parse_args(argv)
    dist_util.setup_dist()
    logger.configure()
    logger.log("creating model and diffusion...")
    model, diffusion = create_model_from_flags(kind, args_to_dict(args, model_defaults(kind)))
    model.to(dist_util.dev())
    return args, model, diffusion


def wrap_ddp(model, **kwargs):
    """``model`` in DistributedDataParallel when several processes train (on this rank's GPU, or the CPU with
    gloo), else ``model`` itself."""
    if dist_util.get_world_size() == 1:
        return model
    device = dist_util.dev()
    on_gpu = device.type == "cuda"
    return DDP(model, device_ids=[device] if on_gpu else None, output_device=device if on_gpu else None,
               bucket_cap_mb=128, find_unused_parameters=False, **kwargs)


def load_optimizer_state(opt, main_checkpoint, step):
    """Load ``opt{step:06d}.pt`` next to ``main_checkpoint`` into ``opt`` when rank 0 finds it."""
    path = bf.join(bf.dirname(main_checkpoint), f"opt{step:06}.pt")
    if dist_util.broadcast_object(bf.exists(path)):
        logger.log(f"loading optimizer state from checkpoint: {path}")
        opt.load_state_dict(read_checkpoint(path))  # moves the state onto the parameters' device
    else:
        logger.log(f"no optimizer state at {path}: the optimizer starts fresh")


class TrainLoop:
    @classmethod
    def from_args(cls, args, *, model, diffusion, data, schedule_sampler=None, **extra):
        """A loop configured by the flags of :func:`training_defaults` (parsed ``args``); ``schedule_sampler``
        replaces the one the flags name."""
        flags = {k: getattr(args, k) for k in training_defaults() if k not in ("data_dir", "schedule_sampler")}
        if schedule_sampler is None:
            schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
        return cls(model=model, diffusion=diffusion, data=data, schedule_sampler=schedule_sampler, **flags, **extra)

    def __init__(self, *, model, diffusion, data, batch_size, microbatch, lr, ema_rate, log_interval, save_interval,
                 resume_checkpoint, use_fp16=False, fp16_scale_growth=1e-3, schedule_sampler=None, weight_decay=0.0,
                 lr_anneal_steps=0, lr_schedule=None, ema_schedule=None, step_callback=None):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = ([float(ema_rate)] if isinstance(ema_rate, (int, float))
                         else [float(r) for r in str(ema_rate).split(",") if r.strip()])
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.lr_schedule = lr_schedule
        self.ema_schedule = ema_schedule
        self.step_callback = step_callback

        self.step = 0
        self.resume_step = 0
        self.global_batch = self.batch_size * dist_util.get_world_size()
        self.sync_cuda = th.cuda.is_available()

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(model=self.model, use_fp16=self.use_fp16,
                                                fp16_scale_growth=fp16_scale_growth)
        self.opt = AdamW(self.mp_trainer.master_params, lr=self.lr, weight_decay=self.weight_decay)
        if self.resume_step:
            load_optimizer_state(self.opt, self._main_checkpoint(), self.resume_step)
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]
        self.ddp_model = wrap_ddp(self.model)
        self.use_ddp = self.ddp_model is not self.model
        self._last_log = (time.perf_counter(), self.resume_step)

    # -- resuming ---------------------------------------------------------------------------------

    def _main_checkpoint(self):
        return find_resume_checkpoint() or self.resume_checkpoint

    def _load_and_sync_parameters(self):
        resume_checkpoint = self._main_checkpoint()
        if resume_checkpoint:
            self.resume_step = parse_resume_step_from_filename(resume_checkpoint)
            logger.log(f"loading model from checkpoint: {resume_checkpoint}...")
            load_checkpoint(self.model, resume_checkpoint)  # collective: rank 0 reads, the others get the bytes
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        ema_checkpoint = dist_util.broadcast_object(find_ema_checkpoint(self._main_checkpoint(), self.resume_step,
                                                                        rate))
        if ema_checkpoint:
            logger.log(f"loading EMA from checkpoint: {ema_checkpoint}...")
            state_dict = {k: v.to(dist_util.dev()) for k, v in read_state_dict(ema_checkpoint).items()}
            ema_params = self.mp_trainer.state_dict_to_master_params(state_dict)
        dist_util.sync_params(ema_params)
        return ema_params

    # -- training ---------------------------------------------------------------------------------

    def run_loop(self):
        """Train until ``lr_anneal_steps`` total steps (forever when 0), saving every ``save_interval``."""
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            total = self.step + self.resume_step
            if total % self.log_interval == 0:
                self._dump_logs()
            if total % self.save_interval == 0:
                self.save()
                # Run for a finite amount of time in integration tests.
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
            if self.step_callback is not None and self.step_callback(self):
                break
        if logger.getkvs():
            self._dump_logs()
        # Save the last checkpoint if it was not just saved.
        if self.step and (self.step + self.resume_step) % self.save_interval:
            self.save()

    def run_step(self, batch, cond):
        if self.lr_schedule is not None:
            set_lr(self.opt, self.lr_schedule(self.step + self.resume_step))
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self._anneal_lr()
        self.log_step()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        for i in range(0, batch.shape[0], self.microbatch):
            micro = batch[i : i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i : i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last_batch = (i + self.microbatch) >= batch.shape[0]
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
            # Gradients are all-reduced once per batch, on its last microbatch.
            sync = last_batch or not self.use_ddp
            with contextlib.nullcontext() if sync else self.ddp_model.no_sync():
                losses = self.diffusion.training_losses(self.ddp_model, micro, t, model_kwargs=micro_cond)
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
                loss = (losses["loss"] * weights).mean()
                log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
                self.mp_trainer.backward(loss)

    def _update_ema(self):
        step = self.step + self.resume_step
        for rate, params in zip(self.ema_rate, self.ema_params):
            decay = rate if self.ema_schedule is None else self.ema_schedule(step, rate)
            update_ema(params, self.mp_trainer.master_params, rate=decay)

    def _anneal_lr(self):
        if not self.lr_anneal_steps or self.lr_schedule is not None:
            return
        frac_done = (self.step + self.resume_step) / self.lr_anneal_steps
        set_lr(self.opt, self.lr * (1 - frac_done))

    def log_step(self):
        logger.logkv("step", self.step + self.resume_step)
        logger.logkv("samples", (self.step + self.resume_step + 1) * self.global_batch)

    def _dump_logs(self):
        """The progress line (step, loss, throughput), then the table of this interval's averages."""
        now, total = time.perf_counter(), self.step + self.resume_step
        since, steps_then = self._last_log
        rate = (total - steps_then) * self.global_batch / max(now - since, 1e-9)
        self._last_log = (now, total)
        loss = logger.getkvs().get("loss")
        loss_text = f"loss {loss:.4f}, " if isinstance(loss, float) else ""
        logger.log(f"step {total}: {loss_text}{rate:.1f} samples/s")
        logger.dumpkvs()

    def save(self):
        save_training_state(self.step + self.resume_step, self.mp_trainer, self.opt,
                            zip(self.ema_rate, self.ema_params))


def set_lr(opt, lr):
    for param_group in opt.param_groups:
        param_group["lr"] = lr


def save_training_state(step, mp_trainer, opt, ema=()):
    """Rank 0 writes model{step:06d}.pt (the master weights), ema_{rate}_{step:06d}.pt for each (rate, params)
    of ``ema`` and opt{step:06d}.pt into :func:`get_blob_logdir`; every rank waits for it."""
    if dist_util.get_rank() == 0:
        for rate, params in [(0, mp_trainer.master_params), *ema]:
            logger.log(f"saving model {rate}...")
            filename = f"model{step:06d}.pt" if not rate else f"ema_{rate}_{step:06d}.pt"
            save_checkpoint_file(mp_trainer.master_params_to_state_dict(params), bf.join(get_blob_logdir(), filename))
        save_checkpoint_file(opt.state_dict(), bf.join(get_blob_logdir(), f"opt{step:06d}.pt"))
    dist_util.barrier()


def save_checkpoint_file(obj, path):
    """``th.save`` a state dict (tensors detached) to a URL (blobfile) or a local path; a local file appears
    only complete (``adm_common.files.atomic_open``), so a crash leaves no half checkpoint."""
    obj = {k: v.detach() if isinstance(v, th.Tensor) else v for k, v in obj.items()}
    path = os.fspath(path)
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            th.save(obj, f)
        return
    with atomic_open(path) as f:
        th.save(obj, f)


def parse_resume_step_from_filename(filename):
    """The step of ``path/to/modelNNNNNN.pt`` (0 when the name has no such number)."""
    split = os.fspath(filename).split("model")
    if len(split) < 2:
        return 0
    try:
        return int(split[-1].split(".")[0])
    except ValueError:
        return 0


def get_blob_logdir():
    """Where checkpoints go: the logger's directory (override to write elsewhere, e.g. a blob store)."""
    return logger.get_dir()


def find_resume_checkpoint():
    """Hook to discover the latest checkpoint automatically (e.g. on blob storage); None here."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """``ema_{rate}_{step:06d}.pt`` next to ``main_checkpoint``, if it exists."""
    if not main_checkpoint:
        return None
    path = bf.join(bf.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if bf.exists(path) else None


def log_loss_dict(diffusion, ts, losses):
    """Log each loss term's mean, and its mean per quarter of the diffusion steps (``{key}_q0`` ...)."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)
