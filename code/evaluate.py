"""Task 4: average PSNR / SSIM of checkpoints and of bilinear / bicubic upsampling on an eval folder.

    python code/evaluate.py                                    # every checkpoints/*/model.pt
    python code/evaluate.py checkpoint=checkpoints/demo/model.pt eval_dir=../shared/data/Set5
    python code/evaluate.py degradation=nearest                # LR made differently than in training

Prints a Markdown table and saves it as <out>.md and <out>.csv.
"""
import csv
import glob
import os
import sys

import pytorch_msssim
import torch
import torch.nn.functional as F
from torch import nn

import config
from dataset import DataError, SRDataset
from models import CheckpointError, load_model


def psnr(prediction, target):
    """Per-image PSNR in dB for images in [0, 1]: -10 log10(MSE)."""
    mse = nn.MSELoss(reduction="none")(prediction, target).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(prediction, target):
    """Per-image SSIM (pytorch-msssim, 11x11 Gaussian window, sigma 1.5) for images in [0, 1]."""
    return pytorch_msssim.ssim(prediction, target, data_range=1.0, size_average=False)


def interpolate(low_res, scale, mode):
    """Upsample with bilinear or bicubic interpolation: the baselines a model has to beat."""
    return F.interpolate(low_res, scale_factor=scale, mode=mode, align_corners=False).clamp(0, 1)


@torch.no_grad()
def evaluate(upscale, dataset, device):
    """Mean L1, PSNR and SSIM of `upscale(lr)` against HR over every image of `dataset`.

    Images differ in size, so they go one at a time. L1 is taken on the raw output (as the training
    loss is); PSNR and SSIM on the output clamped to the valid range [0, 1].
    """
    totals = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0}
    for index in range(len(dataset)):
        low_res, high_res = (t.unsqueeze(0).to(device) for t in dataset[index])
        prediction = upscale(low_res)
        totals["l1"] += F.l1_loss(prediction, high_res).item()
        prediction = prediction.clamp(0, 1)
        totals["psnr"] += psnr(prediction, high_res).item()
        totals["ssim"] += ssim(prediction, high_res).item()
    return {name: total / len(dataset) for name, total in totals.items()}


def markdown_table(title, rows):
    lines = [title, "", "| method | PSNR (dB) | SSIM |", "|---|---:|---:|"]
    lines += [f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} |" for name, m in rows]
    return "\n".join(lines) + "\n"


def write_tables(out, title, rows):
    """Save the table as <out>.md and <out>.csv (fixed decimals, so reruns are byte-identical)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(markdown_table(title, rows))
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["method", "psnr_db", "ssim", "l1"])
        writer.writerows([name, f"{m['psnr']:.4f}", f"{m['ssim']:.5f}", f"{m['l1']:.5f}"] for name, m in rows)
    return out + ".md", out + ".csv"


def checkpoint_paths(cfg):
    if cfg["checkpoint"]:
        return [p for p in cfg["checkpoint"].split(",") if p]
    return sorted(glob.glob(os.path.join(cfg["ckpt_dir"], "*", "model.pt")))


def main(argv):
    cfg = config.from_argv(argv)
    device = config.pick_device(cfg["device"])
    try:
        models = [(path, *load_model(path, device)) for path in checkpoint_paths(cfg)]
        for path, _, payload in models:
            if payload["config"]["scale"] != cfg["scale"]:
                raise CheckpointError(f"{path}: trained for scale {payload['config']['scale']}, "
                                      f"evaluating scale={cfg['scale']}")
        dataset = SRDataset(cfg["eval_dir"], scale=cfg["scale"], degradation=cfg["degradation"], train=False)
    except (CheckpointError, DataError) as err:
        raise SystemExit(f"error: {err}") from None
    if not models:
        print(f"note: no checkpoints given or found under {cfg['ckpt_dir']}/*/model.pt; baselines only",
              file=sys.stderr)

    rows = [(f"{mode} upsampling", evaluate(lambda lr, m=mode: interpolate(lr, cfg["scale"], m), dataset, device))
            for mode in ("bilinear", "bicubic")]
    for path, model, payload in models:
        name = f"{payload['run']} ({payload['config']['model']}, step {payload['step']})"
        rows.append((name, evaluate(model, dataset, device)))

    eval_name = os.path.basename(os.path.normpath(cfg["eval_dir"]))
    title = (f"x{cfg['scale']} on {eval_name} ({len(dataset)} images), "
             f"LR made by {cfg['degradation']} downscaling")
    out = cfg["out"] or os.path.join(cfg["runs_dir"], f"eval_{eval_name}_{cfg['degradation']}")
    print(markdown_table(title, rows))
    for path in write_tables(out, title, rows):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
