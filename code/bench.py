"""Training-speed benchmark: ratios measured in one run, on this machine (make bench).

    python code/bench.py                          # embedded data (data/train), batch 16, 64x64 patches
    python code/bench.py data_dir=data/T91 bench_steps=48

Prints, for BasicSRModel at the configured batch and patch size:
  * the pure training step on a synthetic batch: NCHW fp32 (the naive reference), channels_last, fused Adam,
    with its GFLOP/s and the fraction of the CPU's FMA peak (or the GPU's TFLOP/s);
  * P1: the full training loop (real images, crops, jitter, LR making, loss, Adam) against the pure step;
  * the literal handout pipeline (read_image of the whole file per sample, transforms per sample,
    2 workers) against ours, for the data alone and for the whole loop.
Times are means over `bench_steps` steps after warm-up (a multiple of the 8 batches the batch-wise stream
makes at once). Nothing here is asserted by a test.
"""
import sys
import tempfile

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms

import config
import system
from batches import DeviceBatches, TrainSampler
from dataset import SRDataset, list_images
from models import build_model
from speed import WARMUP, cpu_peak_flops, gpu_bf16_peak, make_trainer, mean_step_seconds, short_training, training_flops

BF16_CHECK_STEPS = 300


def bf16_check(cfg, device):
    """The safety check for bf16 autocast: the same short training (residual model, same seed and data)
    in fp32 and in bf16; returns {amp: final validation PSNR}. bf16 is worth using only if the two agree
    within 0.05 dB."""
    with tempfile.TemporaryDirectory() as folder:
        return {amp: short_training(dict(cfg, device=str(device)), folder, f"bf16_check_{amp}", BF16_CHECK_STEPS,
                                    amp=amp)["val"]["psnr"] for amp in ("off", "bf16")}


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
    """train.py's two ways to the same batches (every augmentation of cfg): sample by sample in DataLoader workers, or
    batch-wise on the device (device_batches)."""
    data = SRDataset.from_config(dict(cfg, bad_files="skip"))
    return DataLoader(data, batch_size=cfg["batch_size"], sampler=TrainSampler(len(data), cfg["seed"]),
                      num_workers=system.data_workers(cfg, device), pin_memory=device.type == "cuda",
                      worker_init_fn=system.ignore_stop_signals)


def device_batches(cfg, device):
    data = SRDataset.from_config(dict(cfg, bad_files="skip"))
    return DeviceBatches.from_config(cfg, data.images, TrainSampler(len(data), cfg["seed"]), device)


def handout_loader(cfg, device):
    """Shuffled, 2 workers, drop_last, as the handout's check; the sampler draws permutation after
    permutation, so a folder smaller than a batch (the embedded one) still fills batches."""
    data = HandoutDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"])
    return DataLoader(data, batch_size=cfg["batch_size"], sampler=RandomSampler(data, num_samples=10 ** 9),
                      num_workers=2, drop_last=True, pin_memory=device.type == "cuda")


def pure_steps(cfg, device, steps, flops):
    """Time the pure step in each variant on a synthetic batch; print them; returns ({name: seconds}, the
    default's name). bf16 variants are skipped on CPUs without bf16 instructions, where they are emulated and
    take many times as long as fp32 (amp=bf16 times them anyway)."""
    bf16_fast = device.type == "cuda" or system.use_bf16(dict(cfg, amp="auto"), device) or cfg["amp"] == "bf16"
    # (name, channels_last, fused Adam, bf16 autocast, torch.compile)
    variants = [("NCHW fp32 (naive reference)", False, False, False, False),
                ("channels_last fp32", True, False, False, False),
                ("channels_last fp32 + fused Adam", True, True, False, False)]
    if bf16_fast:
        variants += [("NCHW bf16 autocast", False, False, True, False), ("channels_last bf16 autocast", True, False, True, False)]
    else:
        print("bf16 variants skipped: this CPU has no AMX or AVX512-BF16 (or torch is told not to use them), so bf16 "
              "is emulated (pass amp=bf16 to time it)")
    if device.type == "cuda":  # compiling takes minutes on a small CPU; where it pays off is the GPU
        variants.append(("channels_last bf16 + torch.compile", True, False, True, True))
    results = mean_step_seconds({name: make_trainer(cfg, device, channels_last, fused, synthetic(cfg), bf16, compiled)[1]
                                 for name, channels_last, fused, bf16, compiled in variants}, steps, device)
    naive = results["NCHW fp32 (naive reference)"]
    if device.type == "cpu":
        peak, derivation = cpu_peak_flops()
        bf16_note = " (bf16 instructions have a higher peak of their own, so bf16 rows can exceed 100%)"
        print(f"CPU fp32 FMA peak {f'{peak / 1e9:.0f} GFLOP/s = ' if peak else ''}{derivation}"
              f"{bf16_note if bf16_fast and peak else ''}")
        for name, seconds in results.items():
            share = f"{flops / seconds / peak:6.1%} of fp32 peak  " if peak else ""
            print(f"  {name:<40} {seconds * 1000:7.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s  "
                  f"{share}{naive / seconds:4.2f}x naive", flush=True)
    else:
        card, peak = gpu_bf16_peak(device)
        print(f"{card}: dense bf16 peak {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown'}")
        for name, seconds in results.items():
            share = f"{flops / seconds / peak:6.1%} of bf16 peak" if peak else ""
            print(f"  {name:<40} {seconds * 1000:7.2f} ms  {flops / seconds / 1e12:6.1f} TFLOP/s  {share}  "
                  f"{cfg['batch_size'] / seconds:8.0f} patches/s  {naive / seconds:4.2f}x naive", flush=True)
    layout, bf16 = system.channels_last_helps(cfg["channels_last"], device), system.use_bf16(cfg, device)
    default = f"{'channels_last' if layout else 'NCHW'} {'bf16 autocast' if bf16 else 'fp32'}"
    default = "NCHW fp32 (naive reference)" if default == "NCHW fp32" else default
    print(f"default here: {default} (channels_last={cfg['channels_last']}, amp={cfg['amp']})")
    return results, default


def full_loops(cfg, device, steps, batches, default):
    """Time the data streams alone and the full loop on each, against the pure default step; print P1 and the
    comparison with the handout's pipeline. P1 first, while the DataLoader streams' workers sit idle with full
    queues: the full loop of the default path and the pure step, timed in turns. Streams fed by workers are
    then timed alone, since taking turns would let their workers fill the queue while another is timed."""
    layout, bf16 = system.channels_last_helps(cfg["channels_last"], device), system.use_bf16(cfg, device)
    ours = "ours, batched on the device" if system.batches_on_device(cfg, device) else "ours, DataLoader"
    pure_name = f"pure step ({default})"
    trainers = {name: make_trainer(cfg, device, layout, False, stream, bf16)[1] for name, stream in batches.items()}
    trainers[pure_name] = make_trainer(cfg, device, layout, False, synthetic(cfg), bf16)[1]
    in_turns = [pure_name, ours] if ours == "ours, batched on the device" else []
    full = mean_step_seconds({name: trainers[name] for name in in_turns}, steps, device)
    data_only = {name: mean_step_seconds({name: lambda b=stream: next(b)}, steps, device)[name]
                 for name, stream in batches.items()}
    full.update({name: mean_step_seconds({name: trainer}, steps, device)[name]
                 for name, trainer in trainers.items() if name not in in_turns})
    print("data alone, per batch: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in data_only.items())
          + f" ({system.data_workers(cfg, device)} DataLoader workers for ours, 2 for the handout's)")
    print("full training loop, per step: " + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in full.items()
                                                       if name != pure_name))
    print(f"P1  full loop ({ours}) / pure step throughput: {full[pure_name] / full[ours]:.3f} (target >= 0.95)")
    print(f"our training loop over the literal handout pipeline: {full['handout'] / full[ours]:.2f}x "
          f"(data alone {data_only['handout'] / data_only[ours]:.1f}x)")
    return full, data_only


def main(argv):
    cfg = config.from_argv(argv, ("bench", "data", "model", "training", "system"), training=True)
    malloc = "tuned" if system.tune_malloc(cfg) else "glibc default"
    device = system.pick_device(cfg["device"])
    steps = cfg["bench_steps"]
    flops = training_flops(build_model(cfg), cfg["batch_size"], cfg["patch_size"])
    print(f"device {device}, {torch.get_num_threads()} threads, batch {cfg['batch_size']}, "
          f"{cfg['patch_size']}x{cfg['patch_size']} HR patches, {flops / 1e9:.1f} GFLOP per step, {steps} timed steps, "
          f"malloc {malloc} (compare with malloc=default)", flush=True)
    # Data workers are started before any computation: forking a process whose OpenMP pool is busy can hang it.
    batches = {"ours, DataLoader": endless(ours_loader(cfg, device)), "handout": endless(handout_loader(cfg, device)),
               "ours, batched on the device": device_batches(cfg, device)}
    for stream in batches.values():
        next(stream)
    first = mean_step_seconds({"naive": make_trainer(cfg, device, False, False, synthetic(cfg))[1]}, 1, device)["naive"]
    print(f"first figure: a naive NCHW fp32 step takes {first * 1000:.0f} ms here; the full measurement takes about "
          f"{first * (steps + WARMUP) * 10 / 60:.0f} min", flush=True)
    results, default = pure_steps(cfg, device, steps, flops)
    print(f"P2  default pure step ({default}) over the naive NCHW fp32 step: "
          f"{results['NCHW fp32 (naive reference)'] / results[default]:.2f}x (target >= 1.3x)", flush=True)
    full, data_only = full_loops(cfg, device, steps, batches, default)
    if "bf16" in default:
        psnr = bf16_check(cfg, device)
        print(f"bf16 check, {BF16_CHECK_STEPS} steps of the residual model on {cfg['data_dir']} -> {cfg['eval_dir']}: validation "
              f"PSNR fp32 {psnr['off']:.3f} dB, bf16 {psnr['bf16']:.3f} dB, difference {psnr['bf16'] - psnr['off']:+.3f} dB "
              f"({'within' if abs(psnr['bf16'] - psnr['off']) < 0.05 else 'NOT within'} 0.05 dB)")
    return {"pure": results, "data": data_only, "full": full}


if __name__ == "__main__":
    main(sys.argv[1:])
