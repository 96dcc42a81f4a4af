"""Task 3 (+ validation from Task 4): train a super-resolution model, step by step.

    python code/train.py                                   # defaults of code/config.py
    python code/train.py run=residual model=residual       # any key=value override
    python code/train.py run=residual resume=auto          # continue where it stopped

Writes TensorBoard logs to runs/<run>/ and checkpoints to checkpoints/<run>/: step<N>.pt every
`ckpt_every` steps (model + optimiser + step, the newest 3 kept; resume=auto continues from the
newest good one), model_best.pt (best validation PSNR) and model.pt at the end.

Exit status: 0 done, 1 bad config/data/checkpoint, 3 diverged (non-finite loss),
75 interrupted by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint (run again with resume=auto).
"""
import glob
import json
import math
import os
import random
import shutil
import signal
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import config
import system
from batches import DeviceBatches, TrainSampler
from dataset import DataError, SRDataset
from evaluate import evaluate, interpolate
from models import MODEL_KEYS, CheckpointError, Discriminator, build_model, load_checkpoint, load_model, load_weights, \
    save_checkpoint
from plots import plot_training_curves

EXIT_DIVERGED, EXIT_INTERRUPTED = 3, 75
# Keys that change what a run computes: resuming with any of them different is refused.
RESULT_KEYS = ("data_dir", "scale", "patch_size", "jitter", "degradation", "model", "num_blocks", "channels",
               "batch_size", "lr", "seed", "gan", "init", "adv_weight", "gan_loss", "perceptual_weight",
               "augment", "lr_schedule", "warmup_steps", "lr_min", "ema")
KEEP_STEP_CHECKPOINTS = 3
PREVIEW_IMAGES, PREVIEW_SIZE = 3, 96


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


def step_checkpoints(ckpt_dir):
    """Periodic checkpoints of a run, newest first."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "step*.pt")), reverse=True)


def newest_good_state(ckpt_dir):
    """The newest periodic checkpoint that loads; a broken one is named and passed over."""
    for path in step_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    return None, None


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
    os.makedirs(run_dir, exist_ok=True)
    os.makedirs(ckpt_dir, exist_ok=True)
    return state_path, state


def init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPUs, gloo on CPUs.

    Returns (rank, world_size, device); a plain `python code/train.py` is rank 0 of 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), world_size, device


def all_ranks_sum(values, world_size):
    """Sum a small tensor over all ranks, so they agree on the loss and on stopping."""
    if world_size > 1:
        dist.all_reduce(values)
    return values


def restore(state_path, state, cfg, model, optimizer, discriminator=None, d_optimizer=None, ema=None):
    """Load a periodic checkpoint into the networks and optimisers, refusing one made with other settings
    (a key that an older checkpoint lacks counts as its default)."""
    made_with = {**config.DEFAULTS, **state["train_config"]}
    keys = RESULT_KEYS + (("max_steps",) if cfg["lr_schedule"] != "constant" else ())  # the schedule's length
    changed = [k for k in keys if made_with[k] != cfg[k]]
    if changed:
        raise CheckpointError(f"{state_path}: was trained with other settings: "
                              + ", ".join(f"{k}={made_with[k]} (now {cfg[k]})" for k in changed))
    load_weights(model, state["model"], state_path)
    optimizer.load_state_dict(state["optimizer"])
    if discriminator is not None:
        load_weights(discriminator, state["discriminator"], state_path)
        d_optimizer.load_state_dict(state["d_optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def initialise(model, cfg):
    """Start from the weights of `cfg["init"]` (the GAN generator from a pixel-loss model), which must
    hold the configured architecture."""
    _, payload = load_model(cfg["init"])
    different = [f"{k}={payload['config'][k]} (configured {cfg[k]})" for k in MODEL_KEYS if payload["config"][k] != cfg[k]]
    if different:
        raise CheckpointError(f"init={cfg['init']}: holds another model: {', '.join(different)}")
    load_weights(model, payload["model"], cfg["init"])
    return payload["step"]


def generator_loss(real_logits, fake_logits, kind):
    """Adversarial loss of the generator. standard: -log D(fake) (SRGAN). relativistic (ESRGAN's RaGAN):
    fakes should look more real than the average real image, and reals less real than the average fake."""
    if kind == "standard":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return (F.binary_cross_entropy_with_logits(real_logits - fake_logits.mean(), torch.zeros_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits - real_logits.mean(), torch.ones_like(fake_logits))) / 2


def discriminator_loss(real_logits, fake_logits, kind):
    """The discriminator's side of `generator_loss`: real HR patches -> 1, predictions -> 0."""
    if kind == "relativistic":
        real_logits, fake_logits = real_logits - fake_logits.mean(), fake_logits - real_logits.mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))) / 2


def vgg_feature_loss(cfg, device):
    """L1 between VGG19 conv5_4 features (ESRGAN's perceptual loss), or None when the ImageNet weights
    are not on this machine: compute nodes often cannot download them, so this never tries to."""
    from torchvision.models import vgg19

    path = cfg["vgg_weights"] or os.path.join(torch.hub.get_dir(), "checkpoints", "vgg19-dcbbb0d2.pth")
    if not os.path.isfile(path):
        print(f"note: perceptual loss off: no VGG19 weights at {path} (set vgg_weights=...); "
              f"training with L1 + adversarial loss only", file=sys.stderr)
        return None
    network = vgg19()
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    features = network.features[:35].to(device).eval().requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    return lambda prediction, target: F.l1_loss(features((prediction - mean) / std), features((target - mean) / std))


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


class StopRequest:
    """Turns SIGTERM/SIGINT/SIGUSR1 (scheduler time limits, Ctrl-C) into a flag the loop checks at
    the next logging step, so the run stops between steps with a checkpoint instead of mid-write.
    A job script may forward a signal that the scheduler also sent to this process: repeats are
    harmless; only a second Ctrl-C stops at once."""

    def __init__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in system.STOP_SIGNALS}

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:  # Ctrl-C twice: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signal = self.signal or signal.Signals(signum).name  # a repeated USR1/TERM changes nothing

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg):
    try:
        config.validate_training(cfg)
    except config.ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    system.tune_malloc(cfg)
    device = system.pick_device(cfg["device"])
    rank, world_size, device = init_distributed(device)
    gan = cfg["gan"]
    if gan and world_size > 1:
        raise SystemExit("config error: gan=true trains in one process (no torchrun with several processes)")
    main_process = rank == 0  # only rank 0 validates, logs and saves
    say = print if main_process else (lambda *args, **kwargs: None)
    bf16 = system.use_bf16(cfg, device)
    setup = system.describe(device, bf16)
    say(f"Using {device} device" + (f", {world_size} processes" if world_size > 1 else "")
        + (", bf16 autocast" if bf16 else ""))
    seed_everything(cfg["seed"])
    try:
        train_set = SRDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"], cfg["degradation"],
                              bad_files=cfg["bad_files"], augment=cfg["augment"])
        val_set = SRDataset(cfg["eval_dir"], scale=cfg["scale"], degradation=cfg["degradation"], train=False,
                            bad_files=cfg["bad_files"])
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None
    run_dir = os.path.join(cfg["runs_dir"], cfg["run"])
    ckpt_dir = os.path.join(cfg["ckpt_dir"], cfg["run"])
    if main_process:
        state_path, state = prepare_folders(cfg, run_dir, ckpt_dir)
    if world_size > 1:
        dist.barrier()  # rank 0 has checked or cleared the folders
    if not main_process:
        state_path, state = newest_good_state(ckpt_dir) if cfg["resume"] == "auto" else (None, None)

    memory_format = torch.channels_last if system.channels_last_helps(cfg["channels_last"], device) \
        else torch.contiguous_format
    raw_model = build_model(cfg).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=cfg["lr"])
    loss_function = nn.L1Loss()
    # Task 6: a discriminator that learns to tell HR patches from predictions, which the model learns to fool
    discriminator = Discriminator().to(device, memory_format=memory_format) if gan else None
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=cfg["lr"]) if gan else None
    perceptual = vgg_feature_loss(cfg, device) if gan and cfg["perceptual_weight"] > 0 else None
    # an exponential moving average of the weights: what is validated and saved when ema > 0
    ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(cfg["ema"])) if cfg["ema"] > 0 else None
    final_model = ema.module if ema is not None else raw_model
    step, samples, elapsed, best_psnr, metrics = 0, 0, 0.0, -math.inf, {}
    try:
        if state is not None:
            restore(state_path, state, cfg, raw_model, optimizer, discriminator, d_optimizer, ema)
        elif cfg["init"]:
            say(f"Starting from the weights of {cfg['init']} (its step {initialise(raw_model, cfg)})")
            if ema is not None:
                ema.module.load_state_dict(raw_model.state_dict())
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    if state is not None:
        step, elapsed, best_psnr, metrics = state["step"], state["elapsed"], state["best_psnr"], state["val"]
        samples = state.get("samples", step * cfg["batch_size"])
        if "rng" in state:
            system.set_rng_states(state["rng"], device)
        say(f"Resuming run '{cfg['run']}' at step {step} from {state_path}")
        if state.get("hardware", setup) != setup:
            say(f"note: this run continues on other hardware or precision: {setup} (was {state['hardware']}); "
                f"its results will not be bit-identical to an uninterrupted run")
    # DDP averages the gradients of the ranks: global batch = batch_size x world_size
    model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else raw_model
    if main_process:
        config.save(cfg, run_dir)
        config.save(cfg, ckpt_dir)
    say(f" * {len(train_set)} training images in {cfg['data_dir']}, {len(val_set)} validation images in "
        f"{cfg['eval_dir']}; logs in {run_dir}, checkpoints in {ckpt_dir}")

    # The sampler continues the run's sample stream where it stopped, so a resumed run sees the same batches.
    sampler = TrainSampler(len(train_set), cfg["seed"], start=samples, rank=rank, world_size=world_size,
                           batch_size=cfg["batch_size"])
    if system.batches_on_device(cfg, device):  # crops, jitter and LR made a batch at a time, on the device
        batches = DeviceBatches.from_config(cfg, train_set.images, sampler, device,
                                            workers=min(1, system.data_workers(cfg, device)))
    else:
        batches = iter(DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler,
                                  num_workers=system.data_workers(cfg, device), pin_memory=device.type == "cuda",
                                  worker_init_fn=system.ignore_stop_signals))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    # events after the saved step come from the interrupted attempt: TensorBoard drops them
    writer = SummaryWriter(run_dir, purge_step=step + 1 if state is not None else None) if main_process else None

    def save_state():
        path = os.path.join(ckpt_dir, f"step{step:06d}.pt")
        gan_state = {"discriminator": discriminator.state_dict(), "d_optimizer": d_optimizer.state_dict()} if gan else {}
        ema_state = {"ema": ema.state_dict()} if ema is not None else {}
        save_checkpoint(path, raw_model, cfg, step, optimizer=optimizer.state_dict(), train_config=cfg,
                        samples=samples, elapsed=elapsed + time.time() - started, best_psnr=best_psnr, val=metrics,
                        rng=system.rng_states(device), hardware=setup, **gan_state, **ema_state)
        for old in step_checkpoints(ckpt_dir)[KEEP_STEP_CHECKPOINTS:]:
            os.remove(old)
        return path

    def stop(message, code):
        progress.close()
        if main_process:
            writer.close()
            print(message, file=sys.stderr)
        stop_request.restore()
        if world_size > 1:
            dist.destroy_process_group()
        raise SystemExit(code)

    # logged means over the last log_every steps: train/l1, and for a GAN its adversarial terms
    logged = ["l1", "adv", "d_loss", "d_real", "d_fake"] if gan else ["l1"]
    running, running_steps = torch.zeros(len(logged), device=device), 0
    started = last_log = time.time()
    stop_request = StopRequest()
    progress = tqdm(total=cfg["max_steps"], initial=step, unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0, disable=not main_process)
    model.train()
    while step < cfg["max_steps"]:
        low_res, high_res = next(batches)
        low_res = low_res.to(device, non_blocking=True, memory_format=memory_format)
        high_res = high_res.to(device, non_blocking=True, memory_format=memory_format)

        if cfg["lr_schedule"] != "constant":
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            high_res_prediction = model(low_res)
            loss = loss_function(high_res_prediction, high_res)
        if not gan:
            loss.backward()
            optimizer.step()
            running += loss.detach()
        else:
            # generator step: L1 content + adversarial (+ perceptual) loss, the discriminator frozen
            discriminator.requires_grad_(False)
            with autocast:
                real_logits, fake_logits = discriminator(high_res), discriminator(high_res_prediction)
                adversarial = generator_loss(real_logits, fake_logits, cfg["gan_loss"])
                generator_total = loss + cfg["adv_weight"] * adversarial
                if perceptual is not None:
                    generator_total = generator_total + cfg["perceptual_weight"] * perceptual(high_res_prediction, high_res)
            generator_total.backward()
            optimizer.step()
            # discriminator step: HR patches are real, the (detached) predictions fake
            discriminator.requires_grad_(True)
            d_optimizer.zero_grad(set_to_none=True)
            with autocast:
                real_logits, fake_logits = discriminator(high_res), discriminator(high_res_prediction.detach())
                d_loss = discriminator_loss(real_logits, fake_logits, cfg["gan_loss"])
            d_loss.backward()
            d_optimizer.step()
            running += torch.stack([loss, adversarial, d_loss, torch.sigmoid(real_logits).mean(),
                                    torch.sigmoid(fake_logits).mean()]).detach()
        if ema is not None:
            ema.update_parameters(raw_model)
        step += 1
        samples += cfg["batch_size"] * world_size
        progress.update(1)
        running_steps += 1
        last = step == cfg["max_steps"]
        log, validate = step % cfg["log_every"] == 0 or last, step % cfg["val_every"] == 0 or last
        save = step % cfg["ckpt_every"] == 0 or last

        if log or validate or save:  # checked before anything is logged or saved; ranks agree here
            agreed = all_ranks_sum(torch.cat([running / running_steps,
                                              torch.tensor([float(stop_request.signal is not None)], device=device)]),
                                   world_size).tolist()
            means, stop_requested = {n: v / world_size for n, v in zip(logged, agreed)}, agreed[-1] > 0
            train_l1 = means["l1"]
            save = save or stop_requested
            if not all(math.isfinite(v) for v in means.values()):
                if main_process:
                    for name, value in means.items():
                        writer.add_scalar(f"train/{name}", value, step)
                kept = step_checkpoints(ckpt_dir)
                bad = ", ".join(f"{n} {v}" for n, v in means.items() if not math.isfinite(v))
                stop(f"error: training loss is {bad if gan else train_l1} at step {step} (diverged); lower lr={cfg['lr']}. "
                     f"Last good checkpoint: {kept[0] if kept else 'none yet'}", EXIT_DIVERGED)
        if log and main_process:
            now = time.time()
            patches_per_s = running_steps * cfg["batch_size"] * world_size / max(now - last_log, 1e-9)
            for name, value in means.items():
                writer.add_scalar(f"train/{name}", value, step)
            progress.set_postfix(loss=f"{train_l1:.4f}", patches_s=f"{patches_per_s:.0f}", refresh=False)
            last_log = now
        if log:
            running.zero_()
            running_steps = 0

        if validate and main_process:
            final_model.eval()
            metrics = evaluate(final_model, val_set, device)
            for name, value in metrics.items():
                writer.add_scalar(f"val/{name}", value, step)
            if cfg["lr_schedule"] != "constant":
                writer.add_scalar("train/lr", learning_rate(cfg, step - 1), step)
            for index, image in enumerate(preview(final_model, val_set, device)):
                writer.add_image(f"val/bilinear|prediction|hr/{index}", image, step)
            writer.flush()
            final_model.train()
            if metrics["psnr"] > best_psnr:
                best_psnr = metrics["psnr"]
                save_checkpoint(os.path.join(ckpt_dir, "model_best.pt"), final_model, cfg, step, val=metrics)
            progress.write(f"step {step}: val L1 {metrics['l1']:.4f}, PSNR {metrics['psnr']:.2f} dB, "
                           f"SSIM {metrics['ssim']:.4f}")
            last_log = time.time()  # validation time is not training throughput

        if save:
            path = None
            if main_process:
                writer.flush()  # logs up to this step are on disk before the checkpoint that resumes after them
                path = save_state()
            if stop_requested and not last:
                stop(f"stopped by {stop_request.signal or 'a signal to another rank'} at step {step}; "
                     f"checkpoint {path}; continue with resume=auto", EXIT_INTERRUPTED)
    progress.close()
    stop_request.restore()
    if world_size > 1:
        dist.destroy_process_group()
    if not main_process:
        return None
    writer.close()

    final_path = save_checkpoint(os.path.join(ckpt_dir, "model.pt"), final_model, cfg, step, val=metrics)
    summary = {"run": cfg["run"], "steps": step, "samples": samples, "processes": world_size,
               "wall_time_s": round(elapsed + time.time() - started, 1), "hardware": setup,
               "torch": torch.__version__, "best_val_psnr": best_psnr, "final_val": metrics}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    curves = plot_training_curves(run_dir, os.path.join(run_dir, "curves.png"))
    print(f" * final model: {final_path}\n * curves: {curves}\n * TensorBoard: tensorboard --logdir {cfg['runs_dir']}")
    return summary


if __name__ == "__main__":
    train(config.from_argv(sys.argv[1:]))
