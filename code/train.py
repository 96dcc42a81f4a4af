"""Task 3 (+ validation from Task 4): train a super-resolution model, step by step.

    python code/train.py                                   # defaults of code/config.py
    python code/train.py run=residual model=residual       # any key=value override
    python code/train.py run=residual resume=true          # continue where it stopped

Writes TensorBoard logs to runs/<run>/ and checkpoints to checkpoints/<run>/:
model_step<N>.pt every `ckpt_every` steps (the newest 3 kept), model.pt at the end, and
train_state.pt (model + optimiser + step) from which `resume=true` continues exactly.
"""
import glob
import json
import math
import os
import platform
import random
import shutil
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import config
from dataset import DataError, SRDataset, TrainSampler
from evaluate import evaluate, interpolate
from models import CheckpointError, build_model, load_checkpoint, load_weights, save_checkpoint
from plots import plot_training_curves

# Keys that change what a run computes: resuming with any of them different is refused.
RESULT_KEYS = ("data_dir", "scale", "patch_size", "jitter", "degradation", "model", "num_blocks", "channels",
               "batch_size", "lr", "seed")
KEEP_STEP_CHECKPOINTS = 3
PREVIEW_IMAGES, PREVIEW_SIZE = 3, 96


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def prepare_folders(cfg):
    """Return (run_dir, ckpt_dir, resuming); never reuse another run's folders unless asked to."""
    run_dir = os.path.join(cfg["runs_dir"], cfg["run"])
    ckpt_dir = os.path.join(cfg["ckpt_dir"], cfg["run"])
    resuming = cfg["resume"] and os.path.isfile(os.path.join(ckpt_dir, "train_state.pt"))
    existing = [d for d in (run_dir, ckpt_dir) if os.path.isdir(d) and os.listdir(d)]
    if existing and not resuming:
        if not cfg["overwrite"]:
            raise SystemExit(f"error: run '{cfg['run']}' already has {existing[0]}; pass resume=true to "
                             f"continue it, overwrite=true to start over, or another run=name")
        for folder in existing:
            shutil.rmtree(folder)
    os.makedirs(run_dir, exist_ok=True)
    os.makedirs(ckpt_dir, exist_ok=True)
    return run_dir, ckpt_dir, resuming


def restore(state_path, cfg, model, optimizer):
    """Load train_state.pt into model and optimiser; returns (step, elapsed seconds)."""
    state = load_checkpoint(state_path)
    changed = [k for k in RESULT_KEYS if state["train_config"].get(k) != cfg[k]]
    if changed:
        raise CheckpointError(f"{state_path}: was trained with other settings: "
                              + ", ".join(f"{k}={state['train_config'].get(k)} (now {cfg[k]})" for k in changed))
    load_weights(model, state["model"], state_path)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["elapsed"]


@torch.no_grad()
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


def prune_step_checkpoints(ckpt_dir):
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "model_step*.pt")))[:-KEEP_STEP_CHECKPOINTS]:
        os.remove(path)


def train(cfg):
    device = config.pick_device(cfg["device"])
    print(f"Using {device} device")
    seed_everything(cfg["seed"])
    try:
        train_set = SRDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"], cfg["degradation"])
        val_set = SRDataset(cfg["eval_dir"], scale=cfg["scale"], degradation=cfg["degradation"], train=False)
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None
    run_dir, ckpt_dir, resuming = prepare_folders(cfg)
    state_path = os.path.join(ckpt_dir, "train_state.pt")

    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    loss_function = nn.L1Loss()
    step, elapsed = 0, 0.0
    if resuming:
        try:
            step, elapsed = restore(state_path, cfg, model, optimizer)
        except CheckpointError as err:
            raise SystemExit(f"error: {err}") from None
        print(f"Resuming run '{cfg['run']}' at step {step}")
    config.save(cfg, run_dir)
    config.save(cfg, ckpt_dir)
    print(f" * {len(train_set)} training images in {cfg['data_dir']}, {len(val_set)} validation images in "
          f"{cfg['eval_dir']}; logs in {run_dir}, checkpoints in {ckpt_dir}")

    # The sampler starts at the first sample of `step`, so a resumed run sees the same batches.
    sampler = TrainSampler(len(train_set), cfg["seed"], start=step * cfg["batch_size"])
    loader = DataLoader(train_set, batch_size=cfg["batch_size"], sampler=sampler, num_workers=cfg["num_workers"],
                        pin_memory=device.type == "cuda")
    # events after the saved step come from the interrupted attempt: TensorBoard drops them
    writer = SummaryWriter(run_dir, purge_step=step + 1 if resuming else None)

    def save_state():
        save_checkpoint(state_path, model, cfg, step, optimizer=optimizer.state_dict(), train_config=cfg,
                        elapsed=elapsed + time.time() - started)

    metrics = {}
    running_loss, running_steps = torch.zeros((), device=device), 0
    started = last_log = time.time()
    batches = iter(loader)
    progress = tqdm(total=cfg["max_steps"], initial=step, unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)
    model.train()
    while step < cfg["max_steps"]:
        low_res, high_res = next(batches)
        low_res = low_res.to(device, non_blocking=True)
        high_res = high_res.to(device, non_blocking=True)

        optimizer.zero_grad(set_to_none=True)
        high_res_prediction = model(low_res)
        loss = loss_function(high_res_prediction, high_res)
        loss.backward()
        optimizer.step()
        step += 1
        progress.update(1)
        running_loss += loss.detach()
        running_steps += 1
        last = step == cfg["max_steps"]

        if step % cfg["log_every"] == 0 or last:
            train_l1 = running_loss.item() / running_steps
            if not math.isfinite(train_l1):
                writer.close()
                raise SystemExit(f"error: training loss is {train_l1} at step {step} (diverged); "
                                 f"lower lr={cfg['lr']}. Last good checkpoint: {state_path}")
            now = time.time()
            patches_per_s = running_steps * cfg["batch_size"] / max(now - last_log, 1e-9)
            writer.add_scalar("train/l1", train_l1, step)
            progress.set_postfix(loss=f"{train_l1:.4f}", patches_s=f"{patches_per_s:.0f}", refresh=False)
            running_loss.zero_()
            running_steps, last_log = 0, now

        if step % cfg["val_every"] == 0 or last:
            model.eval()
            metrics = evaluate(model, val_set, device)
            for name, value in metrics.items():
                writer.add_scalar(f"val/{name}", value, step)
            for index, image in enumerate(preview(model, val_set, device)):
                writer.add_image(f"val/bilinear|prediction|hr/{index}", image, step)
            writer.flush()
            model.train()
            progress.write(f"step {step}: val L1 {metrics['l1']:.4f}, PSNR {metrics['psnr']:.2f} dB, "
                           f"SSIM {metrics['ssim']:.4f}")
            last_log = time.time()  # validation time is not training throughput

        if step % cfg["ckpt_every"] == 0 or last:
            save_checkpoint(os.path.join(ckpt_dir, f"model_step{step:06d}.pt"), model, cfg, step)
            prune_step_checkpoints(ckpt_dir)
            save_state()
    progress.close()
    writer.close()

    final_path = save_checkpoint(os.path.join(ckpt_dir, "model.pt"), model, cfg, step)
    summary = {"run": cfg["run"], "steps": step, "wall_time_s": round(elapsed + time.time() - started, 1),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), "torch": torch.__version__, "final_val": metrics}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    curves = plot_training_curves(run_dir, os.path.join(run_dir, "curves.png"))
    print(f" * final model: {final_path}\n * curves: {curves}\n * TensorBoard: tensorboard --logdir {cfg['runs_dir']}")
    return summary


if __name__ == "__main__":
    train(config.from_argv(sys.argv[1:]))
