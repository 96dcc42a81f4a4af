"""Helpers shared by bench.py and gpu_check.py: one optimisation step as the training loop runs it, its FLOPs,
the hardware's peak, fair timing of several step functions on a machine whose speed drifts, and short
trainings run as users run them (code/train.py in a subprocess)."""
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import system
from models import build_model
from train import Networks, training_step

WARMUP = 3
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def training_flops(model, batch_size, patch_size):
    """FLOPs of one forward + backward pass: each convolution's forward, its weight gradient, and its
    input gradient (except for the first layer, whose input needs none). Biases and activations are ignored."""
    flops = 0
    for index, conv in enumerate(m for m in model.modules() if isinstance(m, nn.Conv2d)):
        forward = 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1] \
            * batch_size * patch_size * patch_size
        flops += forward * (2 if index == 0 else 3)
    return flops


def cpu_peak_flops():
    """fp32 FMA peak: cores x clock x lanes x 2 (multiply-add) x FMA units; returns (flop/s, how it was derived), or
    (None, why) where system.CPUINFO gives no clock (macOS has none, Arm's lists none)."""
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 4)
    fma_units = 2  # Xeon Gold/Platinum and most desktop cores; some Xeon Silver/Bronze parts have 1
    mhz = max([float(line.split(":")[1]) for line in system.cpuinfo_lines() if line.startswith("cpu MHz")], default=0)
    if not mhz:
        return None, f"unknown: no clock in {system.CPUINFO}"
    cores = torch.get_num_threads()
    peak = cores * mhz * 1e6 * lanes * 2 * fma_units
    return peak, f"{cores} cores x {mhz:.0f} MHz x {lanes} fp32 lanes x 2 x {fma_units} FMA units"


def mean_step_seconds(steps_by_name, steps, device):
    """{name: mean seconds of one call} of each step function, timed in turns (a, b, c, a, b, c, ...), so that
    a machine whose speed drifts slows all of them alike and their ratios stay meaningful. The mean, not the
    median: the batch-wise stream makes several batches at every few calls, and throughput must count those."""
    times = {name: [] for name in steps_by_name}
    for index in range(WARMUP + steps):
        for name, step in steps_by_name.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= WARMUP:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.mean(values) for name, values in times.items()}


# Dense bf16 tensor-core peaks (no sparsity) of GPUs this may run on, for the printed fraction.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "V100": 125e12}


def gpu_bf16_peak(device):
    """(the GPU's name, its dense bf16 peak in flop/s or None where GPU_BF16_PEAK does not know it)."""
    card = torch.cuda.get_device_name(device)
    return card, next((value for key, value in GPU_BF16_PEAK.items() if key in card), None)


def make_trainer(cfg, device, channels_last, fused, batches, bf16=False, compile_model=False):
    """A closure running train.training_step (the L1 step of every training) on the next (lr, hr) pair of
    `batches`, without the loop's logging, validation and checkpoints."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg).to(device, memory_format=memory_format)
    networks = Networks(model, torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=fused or None))
    forward = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        low_res, high_res = (t.to(device, non_blocking=True, memory_format=memory_format) for t in next(batches))
        training_step(forward, networks, low_res, high_res, autocast)
    return model, step


def training_command(cfg, folder, run, steps, **changes):
    """`python code/train.py ...` for a short run of the residual model in `folder` (data, device and model size
    from `cfg`), resumable, with 4 checkpoints and one validation at the end."""
    settings = dict(run=run, runs_dir=folder, ckpt_dir=folder, model="residual", max_steps=steps, val_every=steps,
                    ckpt_every=max(1, steps // 4), log_every=max(1, steps // 20), resume="auto", **changes)
    keys = ("data_dir", "eval_dir", "device", "channels", "num_blocks", "batch_size", "patch_size", "seed")
    return [sys.executable, TRAIN_SCRIPT, *(f"{k}={cfg[k]}" for k in keys), *(f"{k}={v}" for k, v in settings.items())]


def short_training(cfg, folder, run, steps, **changes):
    """Run `training_command` to the end; returns the final model.pt's checkpoint dict."""
    done = subprocess.run(training_command(cfg, folder, run, steps, **changes), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: training run {run} failed: {done.stderr.strip().splitlines()[-1:]}")
    return torch.load(os.path.join(folder, run, "model.pt"), weights_only=True)


def run_measured(command):
    """(exit status, stderr, peak resident MB) of a command, the memory measured for that process alone."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        errors.seek(0)
        return os.waitstatus_to_exitcode(status), errors.read().decode(), usage.ru_maxrss / 1024
