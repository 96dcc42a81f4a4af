"""Training-speed benchmark: ratios measured in one run, on this machine (make bench).

    python code/bench.py                          # embedded data (data/train), batch 16, 64x64 patches
    python code/bench.py data_dir=../shared/data/T91 bench_steps=20

Prints, for BasicSRModel at the configured batch and patch size:
  * the pure training step on a synthetic batch: NCHW fp32 (the naive reference), channels_last, fused Adam,
    with its GFLOP/s and the fraction of the CPU's FMA peak (or the GPU's TFLOP/s);
  * P1: the full training loop (real images, crops, jitter, LR making, loss, Adam) against the pure step;
  * the literal handout pipeline (read_image of the whole file per sample, transforms per sample,
    2 workers) against ours, for the data alone and for the whole loop.
Times are medians over `bench_steps` steps after warm-up. Nothing here is asserted by a test.
"""
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

import config
from dataset import SRDataset, TrainSampler, list_images
from models import build_model

WARMUP = 3


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
    """fp32 FMA peak: cores x clock x lanes x 2 (multiply-add) x FMA units; returns (flop/s, how it was derived)."""
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability(), 4)
    fma_units = 2  # Xeon Gold/Platinum and most desktop cores; some Xeon Silver/Bronze parts have 1
    mhz = 0.0
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                mhz = max(mhz, float(line.split(":")[1]))
    cores = torch.get_num_threads()
    peak = cores * mhz * 1e6 * lanes * 2 * fma_units
    return peak, f"{cores} cores x {mhz:.0f} MHz x {lanes} fp32 lanes x 2 x {fma_units} FMA units"


def median_step_seconds(step, steps, device):
    times = []
    for index in range(WARMUP + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_trainer(cfg, device, channels_last, fused, batches):
    """A closure running one optimisation step on the next (lr, hr) pair of `batches`."""
    torch.manual_seed(0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(cfg).to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], fused=fused or None)
    loss_function = nn.L1Loss()

    def step():
        low_res, high_res = next(batches)
        low_res = low_res.to(device, non_blocking=True, memory_format=memory_format)
        high_res = high_res.to(device, non_blocking=True, memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        loss_function(model(low_res), high_res).backward()
        optimizer.step()
    return model, step


def synthetic(cfg):
    torch.manual_seed(0)
    low_res = torch.rand(cfg["batch_size"], 3, cfg["patch_size"] // cfg["scale"], cfg["patch_size"] // cfg["scale"])
    high_res = torch.rand(cfg["batch_size"], 3, cfg["patch_size"], cfg["patch_size"])
    while True:
        yield low_res, high_res


class HandoutDataset(Dataset):
    """The handout's recipe taken literally, as the reference: read_image of the whole file for every
    sample, then RandomCrop, ColorJitter and a bilinear Resize of the crop."""

    def __init__(self, folder, patch_size, scale, jitter):
        self.files = list_images(folder)
        self.transform = transforms.Compose([transforms.RandomCrop(patch_size),
                                             transforms.ColorJitter(jitter, jitter, jitter, jitter)])
        self.resize = transforms.Resize(patch_size // scale)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = torchvision.io.read_image(self.files[index], torchvision.io.ImageReadMode.RGB).float() / 255
        high_res = self.transform(image)
        return self.resize(high_res), high_res


def endless(loader):
    yield from loader  # both samplers are (practically) endless


def ours_loader(cfg, device):
    data = SRDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"], cfg["degradation"],
                     bad_files="skip")
    return DataLoader(data, batch_size=cfg["batch_size"], sampler=TrainSampler(len(data), cfg["seed"]),
                      num_workers=config.data_workers(cfg, device), pin_memory=device.type == "cuda")


def handout_loader(cfg, device):
    """Shuffled, 2 workers, drop_last, as the handout's check; the sampler draws permutation after
    permutation, so a folder smaller than a batch (the embedded one) still fills batches."""
    data = HandoutDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"])
    return DataLoader(data, batch_size=cfg["batch_size"], sampler=RandomSampler(data, num_samples=10 ** 9),
                      num_workers=2, drop_last=True, pin_memory=device.type == "cuda")


def main(argv):
    cfg = config.from_argv(argv, training=True)
    device = config.pick_device(cfg["device"])
    steps = cfg["bench_steps"]
    flops = training_flops(build_model(cfg), cfg["batch_size"], cfg["patch_size"])
    print(f"device {device}, {torch.get_num_threads()} threads, batch {cfg['batch_size']}, "
          f"{cfg['patch_size']}x{cfg['patch_size']} HR patches, {flops / 1e9:.1f} GFLOP per step, {steps} timed steps")

    # Data workers are started before any computation: forking a process whose OpenMP pool is busy can hang it.
    batches = {"ours": endless(ours_loader(cfg, device)), "handout": endless(handout_loader(cfg, device))}
    for stream in batches.values():
        next(stream)

    results = {}
    for name, channels_last, fused in (("pure step, NCHW (naive reference)", False, False),
                                       ("pure step, channels_last", True, False),
                                       ("pure step, channels_last + fused Adam", True, True)):
        _, step = make_trainer(cfg, device, channels_last, fused, synthetic(cfg))
        results[name] = median_step_seconds(step, steps, device)
    naive = results["pure step, NCHW (naive reference)"]
    chosen_layout = config.channels_last_helps(cfg["channels_last"], device)
    chosen = results["pure step, channels_last" if chosen_layout else "pure step, NCHW (naive reference)"]

    if device.type == "cpu":
        peak, derivation = cpu_peak_flops()
        print(f"CPU fp32 peak {peak / 1e9:.0f} GFLOP/s = {derivation}")
        for name, seconds in results.items():
            print(f"  {name:<40} {seconds * 1000:7.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s  "
                  f"{flops / seconds / peak:5.1%} of peak  {naive / seconds:4.2f}x naive")
    else:
        for name, seconds in results.items():
            print(f"  {name:<40} {seconds * 1000:7.2f} ms  {flops / seconds / 1e12:6.1f} TFLOP/s  "
                  f"{cfg['batch_size'] / seconds:8.0f} patches/s  {naive / seconds:4.2f}x naive")
    print(f"default here: channels_last={'on' if chosen_layout else 'off'} ({cfg['channels_last']})")

    data_only = {name: median_step_seconds(lambda b=stream: next(b), steps, device) for name, stream in batches.items()}
    full = {}
    for name, stream in batches.items():
        _, step = make_trainer(cfg, device, chosen_layout, False, stream)
        full[name] = median_step_seconds(step, steps, device)
    print(f"data alone, per batch: ours {data_only['ours'] * 1000:.1f} ms ({config.data_workers(cfg, device)} workers), "
          f"handout {data_only['handout'] * 1000:.1f} ms (2 workers): {data_only['handout'] / data_only['ours']:.1f}x")
    print(f"full training loop, per step: ours {full['ours'] * 1000:.1f} ms, handout {full['handout'] * 1000:.1f} ms")
    print(f"P1  full loop / pure step throughput: {chosen / full['ours']:.3f} (target >= 0.95)")
    print(f"P2  pure step speed-up over the naive NCHW step: {naive / chosen:.2f}x")
    print(f"our training loop over the literal handout pipeline: {full['handout'] / full['ours']:.2f}x")
    return {"pure": results, "data": data_only, "full": full}


if __name__ == "__main__":
    main(sys.argv[1:])
