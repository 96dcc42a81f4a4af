"""Task 3 (+ validation from Task 4): train a super-resolution model, step by step.

    python code/train.py                                   # defaults of code/config.py
    python code/train.py run=residual model=residual       # any key=value override
    python code/train.py run=residual resume=auto          # continue where it stopped

Writes TensorBoard logs to runs/<run>/ and checkpoints to checkpoints/<run>/: step<N>.pt every
`ckpt_every` steps (model + optimiser + step, the newest 3 kept; resume=auto continues from the
newest good one), model_best.pt (best validation PSNR) and model.pt at the end (with ema > 0: the moving
average, and model_raw.pt the last step's own weights); with save_model_at=N also model_<N>.pt, validated at N.

Where things are: the data and the degradation in dataset.py (`SRDataset`, `degrade`), the network in
models.py (`build_model`), the loss and the metrics in metrics.py, the device and precision in system.py.
`train()` below reads top to bottom: set up, resume, then the loop of training step, logging, validation
and checkpoint.

Exit status: 0 done, 1 bad config/data/checkpoint, 3 diverged (non-finite loss),
75 interrupted by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint, or at once by a second Ctrl-C (run again
with resume=auto).
"""
import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import config
import system
from batches import DeviceBatches, TrainSampler
from checkpoints import EXIT_DIVERGED, EXIT_INTERRUPTED, RAW_WEIGHTS, CheckpointError, load_model, load_weights, \
    newest_good_state, save_checkpoint, step_checkpoints
from dataset import DataError, SRDataset
from metrics import LOSS_NAME, evaluate, interpolate, loss_function
from models import MODEL_KEYS, Discriminator, tiled_upscaler, build_model
from plots import plot_training_curves

# Keys that change what a run computes: resuming with any of them different is refused.
RESULT_KEYS = ("data_dir", "scale", "patch_size", "jitter", "degradation", "model", "num_blocks", "channels",
               "batch_size", "lr", "seed", "gan", "init", "adv_weight", "gan_loss",
               "augment", "lr_schedule", "warmup_steps", "lr_min", "ema", "loss", "loss_border", "loss_channels",
               "scale_augment")
KEEP_STEP_CHECKPOINTS = 3
PREVIEW_IMAGES, PREVIEW_SIZE = 3, 96


@dataclass
class Networks:
    """What training updates: the model (not wrapped by DDP), its optimiser, the moving average of its weights
    (ema > 0), and for a GAN the discriminator and its optimiser."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: AveragedModel = None
    discriminator: torch.nn.Module = None
    d_optimizer: torch.optim.Optimizer = None

    @property
    def validated(self):
        """The weights that are validated and saved as model.pt: the moving average where there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self):
        """Their part of a periodic checkpoint."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.discriminator is not None:
            state.update(discriminator=self.discriminator.state_dict(), d_optimizer=self.d_optimizer.state_dict())
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load(self, state, path):
        load_weights(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.discriminator is not None:
            load_weights(self.discriminator, state["discriminator"], path)
            self.d_optimizer.load_state_dict(state["d_optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


@dataclass
class Progress:
    """Where a run stands; saved in every periodic checkpoint and restored from it."""
    step: int = 0
    samples: int = 0  # training samples drawn so far: the position in the sample stream
    elapsed: float = 0.0  # seconds of training before this process started
    best_psnr: float = -math.inf
    val: dict = field(default_factory=dict)  # the latest validation metrics


def learning_rate(cfg, step):
    """The learning rate of training step `step` (0-based), a pure function of the step so that a resumed
    run continues the schedule exactly. cosine: linear warm-up to `lr`, then half a cosine down to
    `lr_min` at `max_steps`: large steps early, small ones to settle at the end (SGDR, Loshchilov & Hutter)."""
    if cfg["lr_schedule"] == "constant":
        return cfg["lr"]
    if step < cfg["warmup_steps"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
    progress = (step - cfg["warmup_steps"]) / max(1, cfg["max_steps"] - cfg["warmup_steps"])
    return cfg["lr_min"] + (cfg["lr"] - cfg["lr_min"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# ---- setup ----

def start_processes(cfg):
    """(device, rank, world_size). Under torchrun (WORLD_SIZE > 1) join the process group, nccl on GPUs and
    gloo on CPUs, each rank on its own GPU; a plain `python code/train.py` is rank 0 of 1."""
    device = system.pick_device(cfg["device"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return device, 0, 1
    if cfg["gan"]:
        raise SystemExit("config error: gan=true trains in one process (no torchrun with several processes)")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device, dist.get_rank(), world_size


def load_data(cfg):
    try:
        return SRDataset.from_config(cfg, train=True), SRDataset.from_config(cfg, train=False)
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None


def prepare_folders(cfg, run_dir, ckpt_dir):
    """Return (state_path, state) to resume from; never reuse another run's folders unless asked to."""
    state_path, state = newest_good_state(ckpt_dir) if cfg["resume"] == "auto" else (None, None)
    existing = [d for d in (run_dir, ckpt_dir) if os.path.isdir(d) and os.listdir(d)]
    if existing and state is None:
        if not cfg["overwrite"]:
            hint = "no checkpoint to resume from; " if cfg["resume"] == "auto" else "pass resume=auto to continue it, "
            raise SystemExit(f"error: run '{cfg['run']}' already has {existing[0]}; {hint}"
                             f"overwrite=true starts it over, or choose another run=name")
        for folder in existing:
            shutil.rmtree(folder)
    system.check_writable(run_dir)  # a read-only or forbidden folder: one line now, not a traceback at the first log
    system.check_writable(ckpt_dir)
    return state_path, state


def lock_run(cfg):
    """Hold an exclusive lock on the run for as long as this process lives, so that the same run started twice
    (two sbatch, a job and an interactive run) stops at once instead of writing one folder twice. The lock is
    the kernel's (fcntl, which network file systems honour too): it goes with its process, so a killed or
    requeued job never leaves a stale one. Returns the open lock file, which must be kept."""
    path = os.path.join(cfg["ckpt_dir"], f".{cfg['run']}.lock")
    try:
        os.makedirs(cfg["ckpt_dir"], exist_ok=True)
        lock = open(path, "a+")
    except OSError as err:
        raise SystemExit(system.write_failure(err.filename or path, err)) from None
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise SystemExit(f"error: run '{cfg['run']}' is already training ({holder}); wait for it, stop it, "
                         f"or choose another run=name") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return lock


def find_state(cfg, run_dir, ckpt_dir, rank, world_size):
    """Rank 0 checks (or clears) the run's folders and finds the checkpoint to resume from; the others wait
    for it, then find the same checkpoint."""
    if rank == 0:
        found = prepare_folders(cfg, run_dir, ckpt_dir)
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        found = newest_good_state(ckpt_dir) if cfg["resume"] == "auto" else (None, None)
    return found


def build_networks(cfg, device, memory_format):
    """The model and its Adam optimiser, the moving average of its weights (ema > 0), and for Task 6 a
    discriminator that learns to tell HR patches from predictions, which the model learns to fool."""
    model = build_model(cfg).to(device, memory_format=memory_format)
    networks = Networks(model, torch.optim.Adam(model.parameters(), lr=cfg["lr"]))
    if cfg["gan"]:
        networks.discriminator = Discriminator().to(device, memory_format=memory_format)
        networks.d_optimizer = torch.optim.Adam(networks.discriminator.parameters(), lr=cfg["lr"])
    if cfg["ema"] > 0:
        networks.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]))
    return networks


def resume(cfg, networks, state_path, state, device, hardware, print_once):
    """Continue from a periodic checkpoint (refusing one made with other settings; a key that an older
    checkpoint lacks counts as its default), or start from `init`'s weights, or from scratch."""
    try:
        if state is None:
            if cfg["init"]:
                print_once(f"Starting from the weights of {cfg['init']} (its step {initialise(networks, cfg)})")
            return Progress()
        made_with = {**config.DEFAULTS, **state["train_config"]}
        keys = RESULT_KEYS + (("max_steps",) if cfg["lr_schedule"] != "constant" else ())  # the schedule's length
        changed = [k for k in keys if not same_setting(k, made_with[k], cfg[k])]
        if changed:
            raise CheckpointError(f"{state_path}: was trained with other settings: "
                                  + ", ".join(f"{k}={made_with[k]} (now {cfg[k]})" for k in changed)
                                  + f"; to start run '{cfg['run']}' over with the new ones: overwrite=true")
        networks.load(state, state_path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if "rng" in state:
        system.set_rng_states(state["rng"], device)
    print_once(f"Resuming run '{cfg['run']}' at step {state['step']} from {state_path}")
    if state.get("hardware", hardware) != hardware:
        print_once(f"note: this run continues on other hardware or precision: {hardware} (was {state['hardware']}); "
            f"its results will not be bit-identical to an uninterrupted run")
    return Progress(state["step"], state.get("samples", state["step"] * cfg["batch_size"]), state["elapsed"],
                    state["best_psnr"], state["val"])


def same_setting(key, made_with, now):
    """Whether a resumed run's setting is unchanged; data folders by their names, so that a run continues where
    its sets moved (../shared/data/T91 -> data/T91)."""
    if key == "data_dir":
        made_with, now = ([os.path.basename(os.path.normpath(p)) for p in dirs.split(",")] for dirs in (made_with, now))
    return made_with == now


def initialise(networks, cfg):
    """Start from the weights of `cfg["init"]` (the GAN generator from a pixel-loss model), which must
    hold the configured architecture."""
    _, payload = load_model(cfg["init"])
    different = [f"{k}={payload['config'][k]} (configured {cfg[k]})" for k in MODEL_KEYS if payload["config"][k] != cfg[k]]
    if different:
        raise CheckpointError(f"init={cfg['init']}: holds another model: {', '.join(different)}")
    load_weights(networks.model, payload["model"], cfg["init"])
    if networks.ema is not None:
        networks.ema.module.load_state_dict(networks.model.state_dict())
    return payload["step"]


def training_batches(cfg, train_set, samples, rank, world_size, device):
    """The endless stream of (LR, HR) training batches, continuing the run's sample stream at `samples`, so a
    resumed run sees the same batches: made batch-wise on the device, or sample by sample by a DataLoader."""
    sampler = TrainSampler(len(train_set), cfg["seed"], start=samples, rank=rank, world_size=world_size,
                           batch_size=cfg["batch_size"])
    workers = system.data_workers(cfg, device)
    if system.batches_on_device(cfg, device):
        return DeviceBatches.from_config(cfg, train_set.images, sampler, device, workers=workers)
    return iter(DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, num_workers=workers,
                           pin_memory=device.type == "cuda", worker_init_fn=system.ignore_stop_signals))


# ---- one step ----

def training_step(model, networks, low_res, high_res, autocast, kind="l1", border=0, channels="rgb"):
    """Forward, loss (the handout's L1, or `kind`, without `border` edge pixels, on `channels`), backward, Adam.
    Returns the values to log by name: the RGB L1 of the pixels in the loss, whatever the loss (curves stay
    comparable)."""
    networks.optimizer.zero_grad(set_to_none=True)
    with autocast:
        prediction = model(low_res)
        loss = loss_function(prediction, high_res, kind, border, channels=channels)
    loss.backward()
    networks.optimizer.step()
    if kind == "l1" and channels == "rgb":
        return {LOSS_NAME: loss.detach()}
    with torch.no_grad(), autocast:
        return {LOSS_NAME: loss_function(prediction, high_res, "l1", border)}


def gan_step(model, networks, low_res, high_res, autocast, kind, adv_weight, border=0):
    """Task 6: a generator step (L1 content + adversarial loss, the discriminator frozen), then a discriminator
    step (HR patches real, the detached predictions fake). Returns the values to log by name; d_real and
    d_fake are D's mean probabilities as its loss reads them (relative to the other side for the relativistic
    loss), so 0.5 / 0.5 means D cannot tell them apart."""
    networks.optimizer.zero_grad(set_to_none=True)
    discriminator = networks.discriminator
    with autocast:
        prediction = model(low_res)
        loss = loss_function(prediction, high_res, "l1", border)
    discriminator.requires_grad_(False)
    with autocast:
        real_logits, fake_logits = discriminator(high_res), discriminator(prediction)
        adversarial = generator_loss(real_logits, fake_logits, kind)
        generator_total = loss + adv_weight * adversarial
    generator_total.backward()
    networks.optimizer.step()
    discriminator.requires_grad_(True)
    networks.d_optimizer.zero_grad(set_to_none=True)
    with autocast:
        real_logits, fake_logits = discriminator(high_res), discriminator(prediction.detach())
        d_loss = discriminator_loss(real_logits, fake_logits, kind)
    d_loss.backward()
    networks.d_optimizer.step()
    if kind == "relativistic":  # what D's loss reads: how much more real than the average of the other side
        real_logits, fake_logits = relativistic(real_logits, fake_logits)
    values = {LOSS_NAME: loss, "adv": adversarial, "d_loss": d_loss, "d_real": torch.sigmoid(real_logits).mean(),
              "d_fake": torch.sigmoid(fake_logits).mean()}
    return {name: value.detach() for name, value in values.items()}


def relativistic(real_logits, fake_logits):
    """ESRGAN's relativistic average logits: each side relative to the mean of the other."""
    return real_logits - fake_logits.mean(), fake_logits - real_logits.mean()


def generator_loss(real_logits, fake_logits, kind):
    """Adversarial loss of the generator. standard: -log D(fake) (SRGAN). relativistic (ESRGAN's RaGAN):
    fakes should look more real than the average real image, and reals less real than the average fake."""
    if kind == "standard":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    real_relative, fake_relative = relativistic(real_logits, fake_logits)
    return (F.binary_cross_entropy_with_logits(real_relative, torch.zeros_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_relative, torch.ones_like(fake_logits))) / 2


def discriminator_loss(real_logits, fake_logits, kind):
    """The discriminator's side of `generator_loss`: real HR patches -> 1, predictions -> 0."""
    if kind == "relativistic":
        real_logits, fake_logits = relativistic(real_logits, fake_logits)
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))) / 2


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C, raised in the middle of whatever runs; a KeyboardInterrupt, so that no `except Exception`
    on its way catches it. train() ends the run with one line (RunRecords.stop_at_once)."""


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1 (scheduler time limits, Ctrl-C) into a flag the loop checks at
    the next logging step, so the run stops between steps with a checkpoint instead of mid-write.
    A job script may forward a signal that the scheduler also sent to this process: repeats are
    harmless; only a second Ctrl-C stops at once. With `announce`, the first Ctrl-C is acknowledged at once,
    so that the user knows a second one is not needed, and what it would do."""

    def __init__(self, announce=True):
        self.signal, self.announce = None, announce
        self.previous = {sig: signal.signal(sig, self.handle) for sig in system.STOP_SIGNALS}

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # Ctrl-C twice: stop now
            self.restore()
            raise StopNow
        first_ctrl_c = self.signal is None and signum == signal.SIGINT
        self.signal = self.signal or signal.Signals(signum).name  # a repeated USR1/TERM changes nothing
        if first_ctrl_c and self.announce:  # after the flag: a second Ctrl-C may come as soon as this is read
            # os.write: a print here could land inside a write to sys.stderr that this signal interrupted
            os.write(2, b"\nCtrl-C: the run stops with a checkpoint at its next logged step; Ctrl-C again stops it "
                        b"at once\n")

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---- logging, validation, checkpoints ----

def means_across_ranks(running, running_steps, stop_request, world_size, names):
    """The mean of each logged value since the last log, and whether any rank was asked to stop: summed over
    the ranks, so that all of them take the same decisions."""
    values = torch.cat([running / running_steps,
                        torch.tensor([float(stop_request.signal is not None)], device=running.device)])
    if world_size > 1:
        dist.all_reduce(values)
    values = values.tolist()
    return {name: value / world_size for name, value in zip(names, values)}, values[-1] > 0


@torch.inference_mode()
def preview(model, val_set, device):
    """Centre crops of the first validation images: bilinear upsampling | prediction | HR."""
    images = []
    for index in range(min(PREVIEW_IMAGES, len(val_set))):
        low_res, high_res = (t.unsqueeze(0).to(device) for t in val_set[index])
        upsampled = interpolate(low_res, val_set.scale, "bilinear")
        prediction = model(low_res).clamp(0, 1)
        height, width = high_res.shape[-2:]
        top, left = max(0, (height - PREVIEW_SIZE) // 2), max(0, (width - PREVIEW_SIZE) // 2)
        crops = [t[0, :, top:top + PREVIEW_SIZE, left:left + PREVIEW_SIZE] for t in (upsampled, prediction, high_res)]
        images.append(torch.cat(crops, dim=-1).cpu())
    return images


class RunRecords:
    """What a run keeps of its steps, for the loop in train() to call when due: the running means of the logged
    values (agreed with the other ranks, with whether to stop), TensorBoard and the progress bar, validation,
    checkpoints, the divergence and signal stops, and the end of the run. Only rank 0 writes."""

    def __init__(self, cfg, networks, progress, val_set, device, world_size, main_process, run_dir, ckpt_dir,
                 hardware, resumed):
        self.cfg, self.networks, self.progress, self.val_set, self.device = cfg, networks, progress, val_set, device
        self.world_size, self.main_process, self.hardware = world_size, main_process, hardware
        self.run_dir, self.ckpt_dir = run_dir, ckpt_dir
        # events after the saved step come from the interrupted attempt: TensorBoard drops them
        self.writer = SummaryWriter(run_dir, purge_step=progress.step + 1 if resumed else None) \
            if main_process else None
        self.logged, self.running, self.running_steps = (), None, 0  # names and sums of the values since the last log
        self.started = self.last_log = time.time()
        self.stop_request = StopRequest(announce=main_process)
        self.bar = tqdm(total=cfg["max_steps"], initial=progress.step, unit="step", dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not main_process)

    def elapsed(self):
        return self.progress.elapsed + time.time() - self.started

    def account(self, values):
        """Add the step just taken (`values`: what it logs, by name) to the running means."""
        if self.running is None:  # the first step names what the run logs
            self.logged, self.running = tuple(values), torch.zeros(len(values), device=self.device)
        self.running += torch.stack([values[name] for name in self.logged])
        self.running_steps += 1
        self.bar.update(1)

    def means_and_stop(self):
        """The running means and whether any rank was asked to stop (every rank calls it: see means_across_ranks)."""
        means, stop_requested = means_across_ranks(self.running, self.running_steps, self.stop_request, self.world_size, self.logged)
        if not all(math.isfinite(v) for v in means.values()):
            self.diverged(means)
        return means, stop_requested

    def log(self, means):
        """TensorBoard and the progress bar (rank 0), then the running means start again (every rank)."""
        if self.main_process:
            now = time.time()
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, self.progress.step)
            patches = self.running_steps * self.cfg["batch_size"] * self.world_size
            patches_per_s = patches / max(now - self.last_log, 1e-9)
            self.bar.set_postfix(loss=f"{means[LOSS_NAME]:.4f}", patches_s=f"{patches_per_s:.0f}", refresh=False)
            self.last_log = now
        self.running.zero_()
        self.running_steps = 0

    def save_model(self, name):
        """The validated weights as checkpoints/<run>/<name> (model_best.pt, model_<step>.pt)."""
        save_checkpoint(os.path.join(self.ckpt_dir, name), self.networks.validated, self.cfg, self.progress.step,
                        val=self.progress.val)

    def stop(self, path):
        """End the run after a stop request, naming the signal and the checkpoint `path` to resume from."""
        by = self.stop_request.signal or "a signal to another rank"
        self.finish(f"stopped by {by} at step {self.progress.step}; checkpoint {path}; continue with resume=auto",
                    EXIT_INTERRUPTED)

    def stop_at_once(self):
        """End the run on a second Ctrl-C, wherever it came: the step in progress is dropped, and the checkpoints on
        disk stay whole (each is written whole or not at all); the line names the one resume=auto continues from."""
        kept = step_checkpoints(self.ckpt_dir)
        resume_from = f"resume=auto continues from {kept[0]}" if kept else \
            "no checkpoint yet, so start it again with overwrite=true"
        self.finish(f"stopped at once by a second Ctrl-C after step {self.progress.step}; {resume_from}",
                    EXIT_INTERRUPTED)

    def validate(self):
        """Validation metrics of the final weights, logged with preview crops; returns whether they are the best."""
        cfg, progress, model = self.cfg, self.progress, self.networks.validated
        model.eval()
        progress.val = evaluate(tiled_upscaler(model), self.val_set, self.device)
        for name, value in progress.val.items():
            self.writer.add_scalar(f"val/{name}", value, progress.step)
        for index, image in enumerate(preview(model, self.val_set, self.device)):
            self.writer.add_image(f"val/bilinear|prediction|hr/{index}", image, progress.step)
        self.writer.flush()
        model.train()
        if cfg["lr_schedule"] != "constant":
            self.writer.add_scalar("train/lr", learning_rate(cfg, progress.step - 1), progress.step)
        improved = progress.val["psnr"] > progress.best_psnr
        progress.best_psnr = max(progress.best_psnr, progress.val["psnr"])
        self.bar.write(f"step {progress.step}: val L1 {progress.val[LOSS_NAME]:.4f}, PSNR {progress.val['psnr']:.2f} dB, "
                       f"SSIM {progress.val['ssim']:.4f}")
        self.last_log = time.time()  # validation time is not training throughput
        return improved

    def save_state(self):
        """A periodic checkpoint to resume from (the newest KEEP_STEP_CHECKPOINTS are kept); returns its path.
        The logs up to this step are flushed first, so they are on disk before the checkpoint that follows them."""
        self.writer.flush()
        progress, networks = self.progress, self.networks
        path = os.path.join(self.ckpt_dir, f"step{progress.step:06d}.pt")
        save_checkpoint(path, networks.model, self.cfg, progress.step, train_config=self.cfg, samples=progress.samples,
                        elapsed=self.elapsed(), best_psnr=progress.best_psnr, val=progress.val,
                        rng=system.rng_states(self.device), hardware=self.hardware, **networks.state())
        for old in step_checkpoints(self.ckpt_dir)[KEEP_STEP_CHECKPOINTS:]:
            os.remove(old)
        return path

    def diverged(self, means):
        if self.main_process:
            for name, value in means.items():
                self.writer.add_scalar(f"train/{name}", value, self.progress.step)
        kept = step_checkpoints(self.ckpt_dir)
        bad = ", ".join(f"{n} {v}" for n, v in means.items() if not math.isfinite(v))
        loss = bad if self.cfg["gan"] else means[LOSS_NAME]
        self.finish(f"error: training loss is {loss} at step {self.progress.step} (diverged); lower "
                    f"lr={self.cfg['lr']}. Last good checkpoint: {kept[0] if kept else 'none yet'}", EXIT_DIVERGED)

    def finish(self, message=None, code=0):
        """Close the logs, give the signals back, leave the process group; with a code, stop the process."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            if message:
                print(message, file=sys.stderr)
        self.stop_request.restore()
        if self.world_size > 1:
            dist.destroy_process_group()
        if code:
            raise SystemExit(code)

    def failed_write(self, err):
        """Stop with one line naming the file, the reason and the free space; the newest step checkpoint written
        before stays, and resume=auto continues from it once there is room."""
        if self.writer is not None:
            with contextlib.suppress(OSError):  # TensorBoard's writer raises its own failure again
                self.writer.close()
            self.writer = None
        self.finish()
        raise SystemExit(system.write_failure(err.filename or self.run_dir, err))

    def summary(self):
        """The final model.pt, runs/<run>/summary.json and curves.png."""
        cfg, progress = self.cfg, self.progress
        final_path = save_checkpoint(os.path.join(self.ckpt_dir, "model.pt"), self.networks.validated, cfg, progress.step,
                                     val=progress.val)
        if self.networks.ema is not None:  # the last step's own weights too, to measure what the average adds
            save_checkpoint(os.path.join(self.ckpt_dir, RAW_WEIGHTS), self.networks.model, cfg, progress.step)
        summary = {"run": cfg["run"], "steps": progress.step, "samples": progress.samples, "processes": self.world_size,
                   "wall_time_s": round(self.elapsed(), 1), "hardware": self.hardware, "torch": torch.__version__,
                   "best_val_psnr": progress.best_psnr, "final_val": progress.val}
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        curves = plot_training_curves(self.run_dir, os.path.join(self.run_dir, "curves.png"))
        print(f" * final model: {final_path}\n * curves: {curves}\n * TensorBoard: tensorboard --logdir {cfg['runs_dir']}")
        return summary


def train(cfg):
    try:
        config.validate_training(cfg)
    except config.ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    # setup: the device and processes, the data, the folders, the networks, and where the run stands
    system.tune_malloc(cfg)
    system.quiet_writer_threads()
    device, rank, world_size = start_processes(cfg)
    main_process = rank == 0  # only rank 0 validates, logs and saves
    print_once = print if main_process else (lambda *args, **kwargs: None)
    bf16 = system.use_bf16(cfg, device)
    hardware = system.describe(device, bf16)
    print_once(f"Using {device} device" + (f", {world_size} processes" if world_size > 1 else "")
        + (", bf16 autocast" if bf16 else ""))
    run_lock = lock_run(cfg) if main_process else None  # noqa: F841 (held until train() returns)
    seed_everything(cfg["seed"])
    train_set, val_set = load_data(cfg)
    run_dir, ckpt_dir = os.path.join(cfg["runs_dir"], cfg["run"]), os.path.join(cfg["ckpt_dir"], cfg["run"])
    state_path, state = find_state(cfg, run_dir, ckpt_dir, rank, world_size)
    layout = torch.channels_last if system.channels_last_helps(cfg["channels_last"], device) else torch.contiguous_format
    networks = build_networks(cfg, device, layout)
    progress = resume(cfg, networks, state_path, state, device, hardware, print_once)
    # DDP averages the gradients of the ranks: global batch = batch_size x world_size
    model = DistributedDataParallel(networks.model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else networks.model
    if main_process:
        with system.failed_writes_exit(run_dir):  # a disk already full
            config.save(cfg, run_dir)
            config.save(cfg, ckpt_dir)
    print_once(f" * {len(train_set)} training images in {cfg['data_dir']}, {len(val_set)} validation images in "
        f"{cfg['eval_dir']}; logs in {run_dir}, checkpoints in {ckpt_dir}")
    batches = training_batches(cfg, train_set, progress.samples, rank, world_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    records = RunRecords(cfg, networks, progress, val_set, device, world_size, main_process, run_dir, ckpt_dir,
                         hardware, resumed=state is not None)

    model.train()
    try:
        while progress.step < cfg["max_steps"]:
            low_res, high_res = (t.to(device, non_blocking=True, memory_format=layout) for t in next(batches))
            if cfg["lr_schedule"] != "constant":
                for group in networks.optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, progress.step)
            if cfg["gan"]:
                values = gan_step(model, networks, low_res, high_res, autocast, cfg["gan_loss"], cfg["adv_weight"],
                                  cfg["loss_border"])
            else:
                values = training_step(model, networks, low_res, high_res, autocast, cfg["loss"], cfg["loss_border"],
                                       cfg["loss_channels"])
            if networks.ema is not None:
                networks.ema.update_parameters(networks.model)
            progress.step += 1
            progress.samples += cfg["batch_size"] * world_size
            records.account(values)
            step, last = progress.step, progress.step == cfg["max_steps"]
            log, check, save = (step % cfg[every] == 0 or last for every in ("log_every", "val_every", "ckpt_every"))
            keep = step == cfg["save_model_at"]
            if not (log or check or save or keep):
                continue
            means, stop_requested = records.means_and_stop()  # all ranks take the same decisions; a NaN stops here
            if log:
                records.log(means)
            improved = records.validate() if (check or keep) and main_process else False
            path = records.save_state() if (save or stop_requested) and main_process else None
            if improved:  # after the resume state, so that a disk filling up here costs this copy, not the run
                records.save_model("model_best.pt")
            if keep and main_process:
                records.save_model(f"model_{step:06d}.pt")
            if stop_requested and not last:
                records.stop(path)
        records.finish()
        return records.summary() if main_process else None
    except StopNow:
        records.stop_at_once()
    except OSError as err:  # a full disk or quota: checkpoints, logs, summary
        records.failed_write(err)
    finally:  # the DataLoader workers stop now, even where a kept traceback holds this frame (plots, errors)
        del batches


if __name__ == "__main__":
    train(config.from_argv(sys.argv[1:], ("run", "data", "input", "model", "training", "gan", "system")))
