"""Task 4: average PSNR / SSIM of checkpoints and of bilinear / bicubic upsampling on an eval folder.

    python code/evaluate.py                                    # every checkpoints/*/model.pt
    python code/evaluate.py checkpoint=checkpoints/demo/model.pt eval_dir=../shared/data/Set5
    python code/evaluate.py degradation=nearest                # LR made differently than in training
    python code/evaluate.py protocol=standard eval_dir=../shared/data/Set5   # the SR papers' protocol

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
import system
from dataset import DataError, SRDataset, crop_to_multiple, decode_image, degrade, imresize_matlab, list_images
from models import CheckpointError, load_model


def psnr(prediction, target):
    """Per-image PSNR in dB for images in [0, 1]: -10 log10(MSE)."""
    mse = nn.MSELoss(reduction="none")(prediction, target).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def ssim(prediction, target):
    """Per-image SSIM (pytorch-msssim, 11x11 Gaussian window, sigma 1.5) for images in [0, 1]."""
    return pytorch_msssim.ssim(prediction, target, data_range=1.0, size_average=False)


def sharpness(prediction, target):
    """Per-image gradient energy of the prediction relative to the target's: mean |horizontal| + |vertical|
    pixel difference, divided by the same for HR. 1 = as much fine detail as HR, < 1 blurrier, > 1 more
    (right or wrong) high frequencies. Needs no downloaded network, unlike perceptual metrics."""
    def energy(image):
        return ((image[..., :, 1:] - image[..., :, :-1]).abs().flatten(1).mean(1)
                + (image[..., 1:, :] - image[..., :-1, :]).abs().flatten(1).mean(1))
    return energy(prediction) / energy(target)


def interpolate(low_res, scale, mode):
    """Upsample with bilinear or bicubic interpolation: the baselines a model has to beat."""
    return F.interpolate(low_res, scale_factor=scale, mode=mode, align_corners=False).clamp(0, 1)


@torch.inference_mode()
def evaluate(upscale, dataset, device, batch_pixels=2_000_000):
    """Mean L1, PSNR, SSIM and sharpness of `upscale(lr)` against HR over every image of `dataset`.

    Images of the same size go through together, up to `batch_pixels` HR pixels a batch, which bounds
    the memory (BSD68's 68 images have two shapes); every metric is still taken per image, then averaged over the images. L1 is taken on
    the raw output (as the training loss is); PSNR, SSIM and sharpness on the output clamped to [0, 1].
    """
    by_shape = {}
    for index in range(len(dataset)):
        low_res, high_res = dataset[index]
        by_shape.setdefault(tuple(high_res.shape), []).append((low_res, high_res))
    totals = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0, "sharpness": 0.0}
    for shape, pairs in by_shape.items():
        batch_size = max(1, batch_pixels // (shape[-2] * shape[-1]))
        for start in range(0, len(pairs), batch_size):
            low_res, high_res = (torch.stack(t).to(device) for t in zip(*pairs[start:start + batch_size]))
            prediction = upscale(low_res)
            totals["l1"] += (prediction - high_res).abs().flatten(1).mean(1).sum().item()
            prediction = prediction.clamp(0, 1)
            totals["psnr"] += psnr(prediction, high_res).sum().item()
            totals["ssim"] += ssim(prediction, high_res).sum().item()
            totals["sharpness"] += sharpness(prediction, high_res).sum().item()
    return {name: total / len(dataset) for name, total in totals.items()}


def luma(image):
    """Y of ITU-R BT.601 for a CxHxW image in [0, 255], rounded as MATLAB's rgb2ycbcr does for 8-bit
    images; a grayscale image (C = 1) is its own Y, as in the published evaluation code."""
    if image.shape[0] == 1:
        return image[0]
    red, green, blue = image
    return (16 + (65.481 * red + 128.553 * green + 24.966 * blue) / 255).round()


def standard_scores(sr, hr, scale):
    """PSNR and SSIM of the standard SR protocol: 8-bit images (CxHxW in [0, 255]), Y channel, `scale`
    pixels shaved from each border, SSIM with the 11x11 Gaussian window (sigma 1.5) on Y in [0, 255]."""
    sr_y, hr_y = (luma(image)[scale:-scale, scale:-scale] for image in (sr, hr))
    psnr_db = 10 * torch.log10(255 ** 2 / ((sr_y - hr_y) ** 2).mean())
    ssim_y = pytorch_msssim.ssim(sr_y[None, None].float(), hr_y[None, None].float(), data_range=255)
    return {"l1": (sr_y - hr_y).abs().mean().item() / 255, "psnr": psnr_db.item(), "ssim": ssim_y.item()}


@torch.inference_mode()
def evaluate_standard(upscale, folder, scale, device):
    """The benchmark protocol of the SR literature (SRCNN, VDSR, EDSR tables) on every image of `folder`:
    LR = MATLAB bicubic imresize of the HR image, rounded to 8 bits; outputs rounded to 8 bits; metrics
    on Y with the border shaved (`standard_scores`). A grayscale image goes through the model as three
    equal channels, and the mean of the output channels is compared with it."""
    totals, paths = {"l1": 0.0, "psnr": 0.0, "ssim": 0.0}, list_images(folder)
    for path in paths:
        hr = crop_to_multiple(decode_image(path, keep_gray=True), scale).double()
        low_res = degrade(hr / 255, scale, "bicubic_matlab").expand(3, -1, -1)
        sr = upscale(low_res[None].float().to(device))[0].double().cpu().clamp(0, 1).mul(255).round()
        if hr.shape[0] == 1:
            sr = sr.mean(0, keepdim=True).round()
        for name, value in standard_scores(sr, hr, scale).items():
            totals[name] += value
    return {name: total / len(paths) for name, total in totals.items()}


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
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    device = system.pick_device(cfg["device"])
    standard = cfg["protocol"] == "standard"
    try:
        models = [(path, *load_model(path, device)) for path in checkpoint_paths(cfg)]
        for path, _, payload in models:
            if payload["config"]["scale"] != cfg["scale"]:
                raise CheckpointError(f"{path}: trained for scale {payload['config']['scale']}, "
                                      f"evaluating scale={cfg['scale']}")
        if standard:
            count = len(list_images(cfg["eval_dir"]))
        else:
            dataset = SRDataset(cfg["eval_dir"], scale=cfg["scale"], degradation=cfg["degradation"], train=False)
            count = len(dataset)
    except (CheckpointError, DataError) as err:
        raise SystemExit(f"error: {err}") from None
    if not models:
        print(f"note: no checkpoints given or found under {cfg['ckpt_dir']}/*/model.pt; baselines only",
              file=sys.stderr)

    if standard:
        def score(upscale):
            return evaluate_standard(upscale, cfg["eval_dir"], cfg["scale"], device)
        rows = [("bicubic (MATLAB imresize)", score(lambda lr: imresize_matlab(lr, cfg["scale"])))]
    else:
        def score(upscale):
            return evaluate(upscale, dataset, device)
        rows = [(f"{mode} upsampling", score(lambda lr, m=mode: interpolate(lr, cfg["scale"], m)))
                for mode in ("bilinear", "bicubic")]
    for path, model, payload in models:
        rows.append((f"{payload['run']} ({payload['config']['model']}, step {payload['step']})", score(model)))

    eval_name = os.path.basename(os.path.normpath(cfg["eval_dir"]))
    if standard:
        title = (f"x{cfg['scale']} on {eval_name} ({count} images), standard protocol: LR by MATLAB bicubic "
                 f"imresize, 8-bit outputs, Y channel (BT.601), {cfg['scale']} px border shaved")
        default_out = f"eval_{eval_name}_standard_x{cfg['scale']}"
    else:
        title = f"x{cfg['scale']} on {eval_name} ({count} images), LR made by {cfg['degradation']} downscaling"
        default_out = f"eval_{eval_name}_{cfg['degradation']}"
    out = cfg["out"] or os.path.join(cfg["runs_dir"], default_out)
    print(markdown_table(title, rows))
    for path in write_tables(out, title, rows):
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
