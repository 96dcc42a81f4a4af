"""Task 3 (+ validation from Task 4): train a super-resolution model, step by step.

    python code/train.py                                      # defaults of code/config.py
    python code/train.py run=my_residual model=residual       # any key=value override
    python code/train.py run=my_residual resume=auto          # continue where it stopped

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
import functools
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
    newest_good_state, save_checkpoint, step_checkpoints, step_path
from dataset import DataError, SRDataset, set_names
from metrics import LOGGED_L1, evaluate, interpolate, loss_function
from models import MODEL_KEYS, Discriminator, tiled_upscaler, build_model
from plots import plot_training_curves

# Keys that change what a run computes: resuming with any of them different is refused.
RESULT_KEYS = ("data_dir", "scale", "patch_size", "jitter", "degradation", "model", "num_blocks", "channels",
               "batch_size", "lr", "seed", "gan", "init", "adv_weight", "gan_loss",
               "augment", "lr_schedule", "warmup_steps", "lr_min", "ema", "loss", "loss_border", "loss_channels",
               "scale_augment", "fm_weight", "disc_channels", "disc_norm")
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
    def ema_or_model(self):
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


def set_learning_rate(optimizer, cfg, step):
    """The scheduled learning rate of training step `step`; a constant one stays as the optimiser was built."""
    if cfg["lr_schedule"] != "constant":
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)


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
                             f"choose another run=name, or overwrite=true deletes its folders and starts over")
        for folder in existing:
            shutil.rmtree(folder)
    system.check_writable(run_dir)  # a read-only or forbidden folder: one line now, not a traceback at the first log
    system.check_writable(ckpt_dir)
    return state_path, state


def lock_path(cfg):
    """The file whose fcntl lock a training of cfg's run holds (lock_run)."""
    return os.path.join(cfg["ckpt_dir"], f".{cfg['run']}.lock")


def lock_run(cfg):
    """Hold an exclusive lock on the run for as long as this process lives, so that the same run started twice
    (two sbatch, a job and an interactive run) stops at once instead of writing one folder twice. The lock is
    the kernel's (fcntl, which network file systems honour too): it goes with its process, so a killed or
    requeued job never leaves a stale one. Returns the open lock file, which must be kept."""
    path = lock_path(cfg)
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
        networks.discriminator = Discriminator(cfg["disc_channels"], spectral=cfg["disc_norm"] == "spectral").to(
            device, memory_format=memory_format)
        networks.d_optimizer = torch.optim.Adam(networks.discriminator.parameters(), lr=cfg["lr"])
    if cfg["ema"] > 0:
        networks.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"]))
    return networks


def resume(cfg, networks, state_path, state, device, hardware, main_process):
    """Continue from a periodic checkpoint (refusing one made with other settings; a key that an older
    checkpoint lacks counts as its default), or start from `init`'s weights, or from scratch."""
    print_once = print if main_process else (lambda *args, **kwargs: None)
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
    its sets moved (/scratch/sets/T91 -> data/T91)."""
    if key == "data_dir":
        made_with, now = set_names(made_with), set_names(now)
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

def step_function(cfg):
    """The training step of the run: the pixel-loss step, or for gan=true the GAN's (generator, then discriminator);
    called as step(model, networks, low_res, high_res, autocast, border=...)."""
    if cfg["gan"]:
        return functools.partial(gan_step, kind=cfg["gan_loss"], adv_weight=cfg["adv_weight"], fm_weight=cfg["fm_weight"])
    return functools.partial(training_step, kind=cfg["loss"], channels=cfg["loss_channels"])


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
        return {LOGGED_L1: loss.detach()}
    with torch.no_grad(), autocast:
        return {LOGGED_L1: loss_function(prediction, high_res, "l1", border)}


def gan_step(model, networks, low_res, high_res, autocast, kind, adv_weight, border=0, fm_weight=0.0):
    """Task 6: a generator step (L1 content + adversarial loss, and with fm_weight > 0 feature matching: the L1
    between D's features of HR and of the prediction, pix2pixHD's stand-in for a perceptual loss that needs no
    download; the discriminator frozen), then a discriminator step (HR patches real, the detached predictions
    fake). Returns the values to log by name; d_real and d_fake are D's mean probabilities as its loss reads them
    (relative to the other side for the relativistic loss), so 0.5 / 0.5 means D cannot tell them apart."""
    networks.optimizer.zero_grad(set_to_none=True)
    discriminator = networks.discriminator
    with autocast:
        prediction = model(low_res)
        loss = loss_function(prediction, high_res, "l1", border)
    discriminator.requires_grad_(False)
    with autocast:
        if fm_weight:
            (real_logits, real_features), (fake_logits, fake_features) = (
                discriminator(image, with_features=True) for image in (high_res, prediction))
            matching = feature_matching(real_features, fake_features)
        else:
            real_logits, fake_logits = discriminator(high_res), discriminator(prediction)
        adversarial = generator_loss(real_logits, fake_logits, kind)
        generator_total = loss + adv_weight * adversarial
        if fm_weight:
            generator_total = generator_total + fm_weight * matching
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
    values = {LOGGED_L1: loss, "adv": adversarial, "d_loss": d_loss, "d_real": torch.sigmoid(real_logits).mean(),
              "d_fake": torch.sigmoid(fake_logits).mean(), **({"fm": matching} if fm_weight else {})}
    return {name: value.detach() for name, value in values.items()}


def feature_matching(real_features, fake_features):
    """The mean over D's stages of the L1 distance between its features of HR and of the prediction; HR's side is
    a target (no gradient)."""
    return sum(F.l1_loss(fake, real.detach()) for real, fake in zip(real_features, fake_features)) / len(real_features)


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
    on its way catches it. train() ends the run with one line (stop_at_once_line)."""


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
    """Centre crops of the first validation images: bilinear upsampling | prediction | HR (the prediction tiled, as
    validation's, so that a large validation photo needs no more memory than a tile)."""
    images = []
    for index in range(min(PREVIEW_IMAGES, len(val_set))):
        low_res, high_res = (t.unsqueeze(0).to(device) for t in val_set[index])
        upsampled = interpolate(low_res, val_set.scale, "bilinear")
        prediction = tiled_upscaler(model)(low_res).clamp(0, 1)
        height, width = high_res.shape[-2:]
        top, left = max(0, (height - PREVIEW_SIZE) // 2), max(0, (width - PREVIEW_SIZE) // 2)
        crops = [t[0, :, top:top + PREVIEW_SIZE, left:left + PREVIEW_SIZE] for t in (upsampled, prediction, high_res)]
        images.append(torch.cat(crops, dim=-1).cpu())
    return images


def open_logs(cfg, run_dir, progress, resumed, main_process):
    """TensorBoard's writer (rank 0; None on the others) and the progress bar. At a resume, TensorBoard drops the
    events that the interrupted attempt logged after the saved step."""
    writer = SummaryWriter(run_dir, purge_step=progress.step + 1 if resumed else None) if main_process else None
    terminal = sys.stderr.isatty()
    bar = tqdm(total=cfg["max_steps"], initial=progress.step, unit="step", dynamic_ncols=True, disable=not main_process,
               mininterval=1.0 if terminal else 30.0, file=sys.stderr if terminal else system.LinesOnly(sys.stderr))
    return writer, bar


def log_scalars(writer, means, step, lr=None):
    """The running means of the training values (and the learning rate of a schedule) in TensorBoard."""
    for name, value in means.items():
        writer.add_scalar(f"train/{name}", value, step)
    if lr is not None:
        writer.add_scalar("train/lr", lr, step)


def log_training(writer, bar, means, step, cfg, steps_all_ranks, since):
    """The training values' running means (and a schedule's learning rate) in TensorBoard, the loss and the
    throughput of the steps of all ranks since the time `since` on the progress bar; returns the time now."""
    now = time.time()
    log_scalars(writer, means, step, learning_rate(cfg, step - 1) if cfg["lr_schedule"] != "constant" else None)
    patches_per_s = steps_all_ranks * cfg["batch_size"] / max(now - since, 1e-9)
    bar.set_postfix(loss=f"{means[LOGGED_L1]:.4f}", patches_s=f"{patches_per_s:.0f}", refresh=False)
    return now


def validate(model, val_set, device, writer, bar, step):
    """Validation metrics of `model` (the weights saved as model.pt), logged with preview crops and printed."""
    model.eval()
    val = evaluate(tiled_upscaler(model), val_set, device)
    for name, value in val.items():
        writer.add_scalar(f"val/{name}", value, step)
    for index, image in enumerate(preview(model, val_set, device)):
        writer.add_image(f"val/bilinear|prediction|hr/{index}", image, step)
    writer.flush()
    model.train()
    bar.write(f"step {step}: val L1 {val[LOGGED_L1]:.4f}, PSNR {val['psnr']:.2f} dB, SSIM {val['ssim']:.4f}")
    return val


def save_state(writer, ckpt_dir, cfg, networks, progress, elapsed, device, hardware):
    """A periodic checkpoint to resume from (the newest KEEP_STEP_CHECKPOINTS are kept); returns its path. The logs
    up to this step are flushed first, so they are on disk before the checkpoint that follows them."""
    writer.flush()
    path = step_path(ckpt_dir, progress.step)
    save_checkpoint(path, networks.model, cfg, progress.step, train_config=cfg, samples=progress.samples,
                    elapsed=elapsed, best_psnr=progress.best_psnr, val=progress.val, rng=system.rng_states(device),
                    hardware=hardware, **networks.state())
    for old in step_checkpoints(ckpt_dir)[KEEP_STEP_CHECKPOINTS:]:
        os.remove(old)
    return path


def save_final(cfg, networks, progress, run_dir, ckpt_dir, world_size, seconds, hardware):
    """The final model.pt (and beside a moving average, model_raw.pt: the last step's own weights, to measure what
    the average adds), runs/<run>/summary.json and curves.png; returns the summary. `seconds`: of training in this
    process."""
    final_path = save_checkpoint(os.path.join(ckpt_dir, "model.pt"), networks.ema_or_model, cfg, progress.step,
                                 val=progress.val)
    if networks.ema is not None:
        save_checkpoint(os.path.join(ckpt_dir, RAW_WEIGHTS), networks.model, cfg, progress.step)
    summary = {"run": cfg["run"], "steps": progress.step, "samples": progress.samples, "processes": world_size,
               "wall_time_s": round(progress.elapsed + seconds, 1), "hardware": hardware, "torch": torch.__version__,
               "best_val_psnr": progress.best_psnr, "final_val": progress.val}
    system.write_file(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2))
    curves = plot_training_curves(run_dir, os.path.join(run_dir, "curves.png"))
    print(f" * final model: {final_path}\n * curves: {curves}\n * TensorBoard: tensorboard --logdir {cfg['runs_dir']}")
    return summary


def divergence_line(cfg, means, step, ckpt_dir):
    """The line of a run whose training values are no longer finite."""
    kept = step_checkpoints(ckpt_dir)
    loss = ", ".join(f"{n} {v}" for n, v in means.items() if not math.isfinite(v)) if cfg["gan"] else means[LOGGED_L1]
    return (f"error: training loss is {loss} at step {step} (diverged); lower lr={cfg['lr']}. Last good checkpoint: "
            f"{kept[0] if kept else 'none yet'}")


def stop_line(stop_request, step, path):
    """The line of a run stopped by a signal (to this rank or another) at a logged step, after its checkpoint."""
    by = stop_request.signal or "a signal to another rank"
    return f"stopped by {by} at step {step}; checkpoint {path}; continue with resume=auto"


def stop_at_once_line(ckpt_dir, step):
    """The line of a run stopped by a second Ctrl-C, wherever it came: the step in progress is dropped, and the
    checkpoints on disk stay whole (each is written whole or not at all)."""
    kept = step_checkpoints(ckpt_dir)
    resume_from = f"resume=auto continues from {kept[0]}" if kept else \
        "no checkpoint yet, so start it again with overwrite=true"
    return f"stopped at once by a second Ctrl-C after step {step}; {resume_from}"


def end_run(writer, bar, world_size, message=None, code=0):
    """Close the logs and leave the process group; with a code, print `message` (rank 0) and stop the process with
    that exit status."""
    bar.close()
    if writer is not None:
        with contextlib.suppress(OSError):  # after a failed write, TensorBoard's writer raises it again
            writer.close()
        if message:
            print(message, file=sys.stderr)
    if world_size > 1 and dist.is_initialized():  # a failed final save ends the run a second time
        dist.destroy_process_group()
    if code:
        raise SystemExit(code)


def start(cfg):
    """(device, rank, world_size, bf16, hardware) of this process, after the training-only config checks; the
    device and precision are system.py's choice."""
    try:
        config.validate_training(cfg)
    except config.ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    system.tune_malloc(cfg)
    system.quiet_writer_threads()
    device, rank, world_size = start_processes(cfg)
    bf16 = system.use_bf16(cfg, device)
    if rank == 0:
        print(f"Using {device} device" + (f", {world_size} processes" if world_size > 1 else "")
              + (", bf16 autocast" if bf16 else ""))
    return device, rank, world_size, bf16, system.describe(device, bf16)


def across_ranks(model, device, world_size):
    """The model as the training step calls it: with several processes wrapped by DDP, which averages the
    gradients of the ranks (global batch = batch_size x world_size)."""
    if world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def save_configs(cfg, run_dir, ckpt_dir, train_set, val_set):
    """config.json beside the logs and the checkpoints (once resuming has accepted the settings), and what is used."""
    with system.failed_writes_exit(run_dir):  # a disk already full
        config.save(cfg, run_dir)
        config.save(cfg, ckpt_dir)
    print(f" * {len(train_set)} training images in {cfg['data_dir']}, {len(val_set)} validation images in "
          f"{cfg['eval_dir']}; logs in {run_dir}, checkpoints in {ckpt_dir}")


def train(cfg):
    # setup: the device and processes, the data, the folders, the networks, and where the run stands
    device, rank, world_size, bf16, hardware = start(cfg)
    main_process = rank == 0  # only rank 0 validates, logs and saves
    run_lock = lock_run(cfg) if main_process else None  # noqa: F841 (held until train() returns)
    seed_everything(cfg["seed"])
    train_set, val_set = load_data(cfg)
    run_dir, ckpt_dir = os.path.join(cfg["runs_dir"], cfg["run"]), os.path.join(cfg["ckpt_dir"], cfg["run"])
    state_path, state = find_state(cfg, run_dir, ckpt_dir, rank, world_size)
    layout = torch.channels_last if system.channels_last_helps(cfg["channels_last"], device) else torch.contiguous_format
    networks = build_networks(cfg, device, layout)
    progress = resume(cfg, networks, state_path, state, device, hardware, main_process)
    model = across_ranks(networks.model, device, world_size)
    if main_process:
        save_configs(cfg, run_dir, ckpt_dir, train_set, val_set)
    batches = training_batches(cfg, train_set, progress.samples, rank, world_size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    take_step = step_function(cfg)
    writer, bar = open_logs(cfg, run_dir, progress, state is not None, main_process)
    names, running, since_log = (), None, 0  # what the steps log, and its sums since the last log
    started = last_log = time.time()

    model.train()
    stop_request = StopRequest(announce=main_process)  # SIGTERM, Ctrl-C: stop at the next logged step (kept to the end)
    try:
        while progress.step < cfg["max_steps"]:
            low_res, high_res = (t.to(device, non_blocking=True, memory_format=layout) for t in next(batches))
            set_learning_rate(networks.optimizer, cfg, progress.step)
            values = take_step(model, networks, low_res, high_res, autocast, border=cfg["loss_border"])
            if networks.ema is not None:
                networks.ema.update_parameters(networks.model)
            progress.step += 1
            progress.samples += cfg["batch_size"] * world_size
            if running is None:  # the first step names what the run logs
                names, running = tuple(values), torch.zeros(len(values), device=device)
            running += torch.stack([values[name] for name in names])
            since_log += 1
            bar.update(1)
            step, last = progress.step, progress.step == cfg["max_steps"]
            log_now, validate_now, checkpoint_now = (step % cfg[every] == 0 or last
                                                     for every in ("log_every", "val_every", "ckpt_every"))
            keep_now = step == cfg["save_model_at"]  # model_<step>.pt, validated
            if not (log_now or validate_now or checkpoint_now or keep_now):
                continue
            # the means over the ranks, and whether any was asked to stop: every rank takes the same decisions
            means, stop_requested = means_across_ranks(running, since_log, stop_request, world_size, names)
            if not all(math.isfinite(value) for value in means.values()):  # diverged: stop at the last good checkpoint
                if main_process:
                    log_scalars(writer, means, step)
                end_run(writer, bar, world_size, divergence_line(cfg, means, step, ckpt_dir), EXIT_DIVERGED)
            if log_now and main_process:
                last_log = log_training(writer, bar, means, step, cfg, since_log * world_size, last_log)
            if log_now:  # the running sums start again, on every rank
                running, since_log = running.zero_(), 0
            improved = False
            if (validate_now or keep_now) and main_process:
                progress.val = validate(networks.ema_or_model, val_set, device, writer, bar, step)
                improved = progress.val["psnr"] > progress.best_psnr
                progress.best_psnr = max(progress.best_psnr, progress.val["psnr"])
                last_log = time.time()  # validation time is not training throughput
            path = save_state(writer, ckpt_dir, cfg, networks, progress, progress.elapsed + time.time() - started,
                              device, hardware) if (checkpoint_now or stop_requested) and main_process else None
            if improved:  # after the resume state, so that a disk filling up here costs this copy, not the run
                save_checkpoint(os.path.join(ckpt_dir, "model_best.pt"), networks.ema_or_model, cfg, step, val=progress.val)
            if keep_now and main_process:
                save_checkpoint(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), networks.ema_or_model, cfg, step,
                                val=progress.val)
            if stop_requested and not last:
                end_run(writer, bar, world_size, stop_line(stop_request, step, path), EXIT_INTERRUPTED)
        end_run(writer, bar, world_size)
        if main_process:  # the final model.pt, summary.json and curves.png
            return save_final(cfg, networks, progress, run_dir, ckpt_dir, world_size, time.time() - started, hardware)
    except StopNow:
        end_run(writer, bar, world_size, stop_at_once_line(ckpt_dir, progress.step), EXIT_INTERRUPTED)
    except OSError as err:  # a full disk or quota: checkpoints, logs, summary
        end_run(writer, bar, world_size)
        raise SystemExit(system.write_failure(err.filename or run_dir, err)) from None
    finally:
        stop_request.restore()  # only now, after the final save
        del batches  # the DataLoader workers stop now, even where a kept traceback holds this frame (plots, errors)


if __name__ == "__main__":
    train(config.from_argv(sys.argv[1:], ("run", "data", "reading", "model", "training", "gan", "system")))
