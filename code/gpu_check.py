"""What a reader needs to trust the GPU path, in one command (make gpu-check; about 5 minutes on one GPU).

    python code/gpu_check.py                                  # the GPU if there is one, else a small CPU version
    python code/gpu_check.py data_dir=data/T91 eval_dir=data/Set5

Prints, for the residual model at the configured batch and patch size:
  1. patches/s of the pure training step (a batch already on the device) and of the full loop (DeviceBatches
     making real batches), timed in turns, and their ratio (target >= 0.9); the step's share of the peak;
  2. validation PSNR after the same short training in fp32 and in bf16;
  3. two identical short runs in the default precision (amp=auto): bit-identical weights;
  4. a run killed with SIGKILL after a checkpoint and continued with resume=auto: bit-identical to 3;
  5. upscaling a 4000x3000 photo (800x600 on a CPU): wall time and peak resident memory.
Training and upscaling run as the scripts users run (code/train.py, code/upscale.py), in subprocesses.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import config
import system
from batches import DeviceBatches, TrainSampler
from checkpoints import step_path
from dataset import SRDataset
from speed import cpu_peak_flops, gpu_bf16_peak, make_trainer, mean_step_seconds, run_measured, short_training, \
    training_command, training_flops

CODE = os.path.dirname(os.path.abspath(__file__))
# (timed steps, training steps, upscaled image size): the GPU version, and the small one a CPU can do in minutes
SIZES = {"cuda": (200, 1000, (4000, 3000)), "cpu": (8, 24, (800, 600))}


def throughput(cfg, device, steps):
    """(pure-step seconds, full-loop seconds, GFLOP per step): the default path, timed in turns."""
    bf16, channels_last = system.use_bf16(cfg, device), system.channels_last_helps(cfg["channels_last"], device)
    data = SRDataset.from_config(dict(cfg, bad_files="skip"))
    stream = DeviceBatches.from_config(cfg, data.images, TrainSampler(len(data), cfg["seed"]), device,
                                       workers=system.data_workers(cfg, device))
    fixed = next(stream)

    def same_batch():
        while True:
            yield fixed

    model, pure = make_trainer(cfg, device, channels_last, False, same_batch(), bf16)
    _, full = make_trainer(cfg, device, channels_last, False, stream, bf16)
    times = mean_step_seconds({"pure": pure, "full": full}, steps, device)
    return times["pure"], times["full"], training_flops(model, cfg["batch_size"], cfg["patch_size"])


def identical(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def killed_then_resumed(cfg, folder, steps):
    """Start a run, SIGKILL it once its second checkpoint exists, continue it with resume=auto; returns (whether the
    kill came before the run ended, the resumed run's checkpoint)."""
    args = training_command(cfg, folder, "killed", steps, amp=cfg["amp"])
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = step_path(os.path.join(folder, "killed"), 2 * max(1, steps // 4))
    while not os.path.exists(marker) and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # nothing, where the run has ended already
    killed = process.wait() == -signal.SIGKILL
    return killed, short_training(cfg, folder, "killed", steps, amp=cfg["amp"])


def upscale_photo(folder, checkpoint, size, device):
    """(seconds, peak resident MB of the upscaling process) for a real photo tiled up to `size`."""
    from skimage import data

    photo = data.astronaut()
    tiles = np.tile(photo, (size[1] // photo.shape[0] + 1, size[0] // photo.shape[1] + 1, 1))
    path = os.path.join(folder, "photo.png")
    Image.fromarray(tiles[:size[1], :size[0]]).save(path)
    started = time.time()
    status, errors, peak_mb = run_measured([sys.executable, os.path.join(CODE, "upscale.py"),
                                            f"checkpoint={checkpoint}", f"input={path}", f"device={device}"])
    if status:
        raise SystemExit(f"error: upscale.py failed: {errors.strip().splitlines()[-1:]}")
    with Image.open(os.path.join(folder, "photo_x2.png")) as out:
        assert out.size == (2 * size[0], 2 * size[1]), out.size
    return time.time() - started, peak_mb


def main(argv):
    cfg = config.from_argv(argv, ("data", "model", "training", "system"), training=True)
    system.tune_malloc(cfg)
    device = system.pick_device(cfg["device"])
    timed_steps, train_steps, photo_size = SIZES[device.type]
    print(f"gpu-check on {system.describe(device, system.use_bf16(cfg, device))}"
          + ("" if device.type == "cuda" else ": no GPU here, so the small CPU version (GPU figures still to measure)"))
    summary = []

    pure, full, flops = throughput(dict(cfg, model="residual"), device, timed_steps)
    if device.type == "cuda":
        _, peak = gpu_bf16_peak(device)
        share = f"{flops / pure / peak:.1%} of the dense bf16 peak" if peak else "bf16 peak of this GPU unknown"
    else:
        peak, derivation = cpu_peak_flops()
        share = f"{flops / pure / peak:.1%} of the fp32 FMA peak" if peak else f"fp32 FMA peak {derivation}"
    ratio = pure / full
    summary.append(f"1 throughput: pure step {cfg['batch_size'] / pure:,.0f} patches/s ({pure * 1000:.2f} ms, "
                   f"{flops / pure / 1e12:.2f} TFLOP/s, {share}); full loop {cfg['batch_size'] / full:,.0f} patches/s; "
                   f"ratio {ratio:.3f} ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.9 target)")
    print(summary[-1], flush=True)

    with tempfile.TemporaryDirectory() as folder:
        runs = {amp: short_training(cfg, folder, f"amp_{amp}", train_steps, amp=amp) for amp in ("off", "bf16")}
        psnr = {amp: run["val"]["psnr"] for amp, run in runs.items()}
        differ = not identical(runs["off"], runs["bf16"])
        summary.append(f"2 fp32 vs bf16 after {train_steps} steps: {psnr['off']:.4f} vs {psnr['bf16']:.4f} dB "
                       f"(difference {psnr['bf16'] - psnr['off']:+.4f} dB; weights {'differ' if differ else 'EQUAL'})")
        print(summary[-1], flush=True)

        # what users run: the default precision (amp=auto)
        straight = short_training(cfg, folder, "straight", train_steps, amp=cfg["amp"])
        same = identical(straight, short_training(cfg, folder, "again", train_steps, amp=cfg["amp"]))
        summary.append(f"3 two identical runs (amp={cfg['amp']}): {'bit-identical' if same else 'DIFFERENT'} weights")
        print(summary[-1], flush=True)

        killed, resumed = killed_then_resumed(cfg, folder, train_steps)
        same = identical(straight, resumed)
        summary.append(f"4 SIGKILL after a checkpoint, then resume=auto: {'bit-identical' if same else 'DIFFERENT'} "
                       "to the uninterrupted run" if killed else "4 NOT CHECKED: the run ended before the SIGKILL")
        print(summary[-1], flush=True)

        seconds, rss = upscale_photo(folder, os.path.join(folder, "straight", "model.pt"), photo_size, device)
        summary.append(f"5 upscale.py on a {photo_size[0]}x{photo_size[1]} photo: {seconds:.1f} s, "
                       f"peak resident memory {rss:,.0f} MB")
        print(summary[-1], flush=True)
    print("\nsummary\n" + "\n".join(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
