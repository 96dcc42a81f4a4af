"""The metrics, in one place: the training loss, PSNR, SSIM (pytorch-msssim), a sharpness ratio, GMSD (piq), and the two
evaluation protocols that average them over a folder: RGB against the configured degradation (`evaluate`,
also the validation of train.py) and the SR literature's (`evaluate_standard`: MATLAB bicubic LR, Y channel)."""
import piq
import pytorch_msssim
import torch
import torch.nn.functional as F
from torch import nn

from dataset import MAX_PIXELS, MIN_EVAL_SIZE, crop_to_multiple, degrade, read_folder, to_float

# The tag of the RGB L1 that every run logs whatever its loss (train/l1, val/l1), so that all curves compare.
LOGGED_L1 = "l1"
PSNR_CAP = 100.0  # dB: the PSNR of an image identical to its reference (tables count such images)


# ITU-R BT.601 luma as MATLAB's rgb2ycbcr computes it: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B
# in [0, 255]; the standard protocol's `luma` and the luma-only training loss.
BT601 = (65.481, 128.553, 24.966)


def unit_luma(image):
    """(Y - 16) / 255 of RGB images (...x3xHxW) in [0, 1], BT.601 as `luma`, unrounded, with their channel axis
    kept (...x1xHxW); float32 whatever autocast computed them in."""
    weights = torch.tensor(BT601, device=image.device).div(255).view(3, 1, 1)
    return (image * weights).sum(-3, keepdim=True)


def loss_function(prediction, target, kind="l1", border=0, per_image=False, channels="rgb"):
    """The training loss over the crop without `border` pixels at each edge: l1 (the handout's), or l2 (the mean
    squared error, which PSNR measures). Edge pixels see the crop's zero padding, which a whole test image has
    only at its own border, so a border as wide as the receptive field trains on what the model meets at test.
    channels="y": the loss on luma only, the channel the SR literature's tables score (VDSR trains on Y alone).
    per_image: one value an image of the batch (validation averages them over the images), else the batch mean."""
    if border:
        prediction, target = (t[..., border:-border, border:-border] for t in (prediction, target))
    if channels == "y":
        prediction, target = (unit_luma(t) for t in (prediction, target))
    loss = F.l1_loss if kind == "l1" else F.mse_loss
    if per_image:
        return loss(prediction, target, reduction="none").flatten(1).mean(1)
    return loss(prediction, target)


def psnr(prediction, target):
    """Per-image PSNR in dB for images in [0, 1]: -10 log10(MSE), at most PSNR_CAP (identical images would
    give infinity, and one such image would make a whole table's average infinite)."""
    mse = nn.MSELoss(reduction="none")(prediction, target).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(10 ** (-PSNR_CAP / 10)))


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


def gmsd(prediction, target):
    """Per-image Gradient Magnitude Similarity Deviation (Xue et al. 2014, piq) for images in [0, 1]: how unevenly
    the local gradient magnitudes (edges, texture) agree with HR's across the image; 0 = identical. A published
    structural measure that needs no downloaded network; unlike sharpness, wrong extra texture raises it."""
    return piq.gmsd(prediction, target, reduction="none", data_range=1.0)


def radial_power_spectrum(image, bins=32):
    """The radially averaged power spectrum of a CxHxW image in [0, 1] (its luma, a Hann window against the
    edges' jump): the mean |FFT|^2 in `bins` rings of spatial frequency from 0 to Nyquist (0.5 cycles/pixel),
    rings beyond Nyquist on the diagonals left out. Texture is power at high frequencies: comparing an output's
    spectrum with HR's says whether it restores HR's fine detail (near HR), lacks it (below) or adds other (above)."""
    gray = unit_luma(image.float())[0] if image.shape[0] == 3 else image.float().mean(0)
    height, width = gray.shape
    window = torch.outer(torch.hann_window(height, periodic=False, device=image.device),
                         torch.hann_window(width, periodic=False, device=image.device))
    power = torch.fft.fft2((gray - gray.mean()) * window).abs().square()
    radius = torch.sqrt(torch.fft.fftfreq(height, device=image.device)[:, None].square()
                        + torch.fft.fftfreq(width, device=image.device)[None, :].square())
    ring = (radius / 0.5 * bins).long()
    inside = ring < bins
    totals = torch.zeros(bins, device=image.device).index_add_(0, ring[inside], power[inside])
    counts = torch.zeros(bins, device=image.device).index_add_(0, ring[inside], torch.ones_like(power[inside]))
    return totals / counts.clamp(min=1)


def power_ratio_db(prediction, target, bins=32):
    """10 log10 of the prediction's power over HR's in each ring of radial_power_spectrum, in dB (0 = HR's)."""
    ratio = radial_power_spectrum(prediction, bins) / radial_power_spectrum(target, bins).clamp(min=1e-20)
    return 10 * torch.log10(ratio.clamp(min=1e-20))


def high_frequency_gap(prediction, target, bins=32):
    """The mean of power_ratio_db over the upper half of the frequencies (0.25 to 0.5 cycles/pixel), in dB: 0 = HR's
    texture energy, negative = smoother than HR, positive = more high-frequency energy than HR (right or wrong).
    Needs no downloaded network."""
    return power_ratio_db(prediction, target, bins)[bins // 2:].mean()


def interpolate(low_res, scale, mode):
    """Upsample with bilinear or bicubic interpolation: the baselines a model has to beat."""
    return F.interpolate(low_res, scale_factor=scale, mode=mode, align_corners=False).clamp(0, 1)


@torch.inference_mode()
def evaluate(upscale, dataset, device, batch_pixels=512 * 512):
    """Mean L1, PSNR, SSIM, sharpness and GMSD of `upscale(lr)` against HR over every image of `dataset`.

    Images of the same size go through together, up to `batch_pixels` HR pixels a batch: about one tile of
    `models.tiled_upscaler` at x2, so that a set of small images needs no more memory than one large image (the
    model's 64-channel activations are at HR size; larger batches were no faster on a CPU: README, Performance).
    Every metric is still taken per image, then averaged over the images. L1 is taken on
    the raw output (as the training loss is); the others on the output clamped to [0, 1].
    """
    by_shape = {}  # image indices by HR shape, in order; pairs are made a batch at a time (bounded memory)
    for index, size in enumerate(dataset.sizes):
        height, width = (side // dataset.scale * dataset.scale for side in size)
        by_shape.setdefault((height, width), []).append(index)
    totals = {LOGGED_L1: 0.0, "psnr": 0.0, "ssim": 0.0, "sharpness": 0.0, "gmsd": 0.0}
    identical = 0
    for (height, width), indices in by_shape.items():
        batch_size = max(1, batch_pixels // (height * width))
        for start in range(0, len(indices), batch_size):
            pairs = [dataset[index] for index in indices[start:start + batch_size]]
            low_res, high_res = (torch.stack(t).to(device) for t in zip(*pairs))
            prediction = upscale(low_res)
            totals[LOGGED_L1] += loss_function(prediction, high_res, per_image=True).sum().item()
            prediction = prediction.clamp(0, 1)
            scores = psnr(prediction, high_res)
            identical += int((scores >= PSNR_CAP - 1e-3).sum())
            totals["psnr"] += scores.sum().item()
            totals["ssim"] += ssim(prediction, high_res).sum().item()
            totals["sharpness"] += sharpness(prediction, high_res).sum().item()
            totals["gmsd"] += gmsd(prediction, high_res).sum().item()
    means = {name: total / len(dataset) for name, total in totals.items()}
    return {**means, "identical": identical} if identical else means


def luma(image):
    """Y of ITU-R BT.601 for a CxHxW image in [0, 255], rounded as MATLAB's rgb2ycbcr does for 8-bit
    images; a grayscale image (C = 1) is its own Y, as in the published evaluation code."""
    if image.shape[0] == 1:
        return image[0]
    red, green, blue = image
    return (16 + (BT601[0] * red + BT601[1] * green + BT601[2] * blue) / 255).round()


def standard_scores(sr, hr, scale):
    """PSNR and SSIM of the standard SR protocol: 8-bit images (CxHxW in [0, 255]), Y channel, `scale`
    pixels shaved from each border, SSIM with the 11x11 Gaussian window (sigma 1.5) on Y in [0, 255]."""
    sr_y, hr_y = (luma(image)[scale:-scale, scale:-scale] for image in (sr, hr))
    psnr_db = 10 * torch.log10(255 ** 2 / ((sr_y - hr_y) ** 2).mean().clamp_min(255 ** 2 * 10 ** (-PSNR_CAP / 10)))
    ssim_y = pytorch_msssim.ssim(sr_y[None, None].float(), hr_y[None, None].float(), data_range=255)
    return {LOGGED_L1: (sr_y - hr_y).abs().mean().item() / 255, "psnr": psnr_db.item(), "ssim": ssim_y.item()}


def standard_set(folder, scale, bad_files="error", max_pixels=MAX_PIXELS, stream=False):
    """The HR images of `folder` for `evaluate_standard`: as stored (8-bit, 16-bit, float), gray kept gray, read
    once (with stream=True checked once and decoded again at each use: `dataset.FolderImages`)."""
    return read_folder(folder, MIN_EVAL_SIZE * scale, "evaluation", scale, bad_files, max_pixels, keep_gray=True,
                       stream=stream)[1]


@torch.inference_mode()
def evaluate_standard(upscale, images, scale, device):
    """The benchmark protocol of the SR literature (SRCNN, VDSR, EDSR tables) on `images` (`standard_set`):
    LR = MATLAB bicubic imresize of the HR image, rounded to 8 bits; outputs rounded to 8 bits; metrics
    on Y with the border shaved (`standard_scores`). A grayscale image goes through the model as three
    equal channels, and the mean of the output channels is compared with it; a 16-bit or float HR image is
    rounded to 8 bits first."""
    totals, identical = {LOGGED_L1: 0.0, "psnr": 0.0, "ssim": 0.0}, 0
    for image in images:
        hr = crop_to_multiple(image, scale)
        hr = (hr if hr.dtype == torch.uint8 else to_float(hr).mul(255).round()).double()
        low_res = degrade(hr / 255, scale, "bicubic_matlab").expand(3, -1, -1)
        sr = upscale(low_res[None].float().to(device))[0].double().cpu().clamp(0, 1).mul(255).round()
        if hr.shape[0] == 1:
            sr = sr.mean(0, keepdim=True).round()
        scores = standard_scores(sr, hr, scale)
        identical += scores["psnr"] >= PSNR_CAP - 1e-3
        for name, value in scores.items():
            totals[name] += value
    means = {name: total / len(images) for name, total in totals.items()}
    return {**means, "identical": identical} if identical else means


def markdown_table(title, rows):
    lines = [title, "", "| method | PSNR (dB) | SSIM |", "|---|---:|---:|"]
    lines += [f"| {name} | {m['psnr']:.2f}{'*' if m.get('identical') else ''} | {m['ssim']:.4f} |" for name, m in rows]
    if any(m.get("identical") for _, m in rows):
        lines += ["", f"\\* includes images identical to HR, counted as {PSNR_CAP:.0f} dB: "
                  + ", ".join(f"{name} {m['identical']}" for name, m in rows if m.get("identical"))]
    return "\n".join(lines) + "\n"
