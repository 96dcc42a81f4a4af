"""Upscale your own images x2 (a checkpoint's scale) with a trained checkpoint; by default the final model
(checkpoints.FINAL_MODEL).

    python code/upscale.py input=photo.jpg                  # photo_x2.png, with checkpoints/final/model.pt
    python code/upscale.py checkpoint=checkpoints/residual/model.pt input=photo.jpg output=photo_x2.png
    python code/upscale.py input=folder/ output=out_folder/ ensemble=true
    python code/upscale.py input=photo.jpg page=photo_page      # + photo_page/index.html: input | bicubic | model

Any image the dataset reader accepts (PNG, JPEG, BMP, TIFF, ...; gray, palette, RGBA, 16-bit) is written
as an 8-bit PNG: gray stays gray, and an alpha channel is upscaled bilinearly and kept. Large images go
through the model in overlapping tiles, so memory stays bounded; with an overlap that covers the
model's receptive field the result equals that of the whole image at once. On a CPU the model runs in onnxruntime
(models.OnnxModel; onnxruntime=false: in PyTorch).
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import config
import pages
import system
from dataset import IMAGE_EXTENSIONS, MAX_PIXELS, DataError, decode_image, list_images, open_image
from checkpoints import CheckpointError, final_model, load_model
from models import OnnxModel, self_ensemble, upscale_tiled


def read_extras(path, scale, max_pixels):
    """What of the input the PNG keeps besides the pixels: the alpha channel (a 1xHxW float tensor in [0, 1],
    the right way up, or None) and the save options for the ICC colour profile and the resolution (DPI x scale,
    so that the printed size stays the same)."""
    with open_image(path, max_pixels) as pil:
        options = {"icc_profile": pil.info["icc_profile"]} if pil.info.get("icc_profile") else {}
        if "dpi" in pil.info:
            options["dpi"] = tuple(float(d) * scale for d in pil.info["dpi"])
        if not has_alpha(pil):
            return None, options
        alpha = np.asarray(ImageOps.exif_transpose(pil).convert("RGBA"))[..., 3]
    return torch.from_numpy(alpha.copy())[None].float() / 255, options


# The memory one upscaling may hold, in bytes per pixel of max_pixels (7.5 GB at the default): an image is refused
# from its header when held_bytes exceeds it. At x2 held_bytes is 34 bytes an input pixel (54 with alpha), so
# inputs up to ~2.2x max_pixels (1.4x with alpha) fit.
BUDGET_BYTES_PER_MAX_PIXEL = 75


def held_bytes(width, height, scale, alpha):
    """What `upscale_file` holds at its peak for a width x height input: the decoded input (6 bytes a pixel at
    most, 16-bit RGB), the 8-bit output and Pillow's copy of it while the PNG is written (3 + 4 bytes an
    output pixel) and, with an alpha channel, its bilinear upsampling (4 bytes an output pixel). The model's
    tiles add a bounded amount, whatever the image."""
    return width * height * (6 + scale * scale * (7 + 5 * alpha))


def check_size(path, scale, max_pixels):
    """Refuse from the header alone, before decoding, an image whose upscaling would hold more than max_pixels
    allows (a decompression bomb among them). Returns the number of pixels to let the decoder read."""
    with open_image(path, max_pixels=math.inf) as pil:
        (width, height), alpha = pil.size, has_alpha(pil)
    needed, budget = held_bytes(width, height, scale, alpha), max_pixels * BUDGET_BYTES_PER_MAX_PIXEL
    if needed > budget:
        raise DataError(f"{path}: {width}x{height} px ({width * height / 1e6:.0f} megapixels) would hold "
                        f"{needed / 1e9:.1f} GB to upscale x{scale}, above the {budget / 1e9:.1f} GB that "
                        f"max_pixels={max_pixels} allows; raise max_pixels to read it")
    return width * height


def has_alpha(pil):
    return pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info)


def upscale_file(model, path, out_path, scale, tile, margin, ensemble, device, max_pixels=MAX_PIXELS):
    """Write the x`scale` PNG of `path`. The output is held in 8 bits, filled tile by tile, in the
    height x width x channels layout that Pillow takes without another copy."""
    image = decode_image(path, keep_gray=True, max_pixels=check_size(path, scale, max_pixels)).to(device)
    gray = image.shape[0] == 1
    alpha, options = read_extras(path, scale, max_pixels=image.shape[-2] * image.shape[-1])
    height, width = image.shape[-2] * scale, image.shape[-1] * scale
    pixels = torch.empty(height, width, 3 + (alpha is not None), dtype=torch.uint8)
    tiles = len(range(0, image.shape[-2], tile)) * len(range(0, image.shape[-1], tile))
    with tqdm(total=tiles, unit="tile", desc=os.path.basename(path), leave=False) as progress:
        upscale_tiled(self_ensemble(model) if ensemble else model, image.expand(3, -1, -1)[None], scale, tile, margin,
                      progress, output=pixels[..., :3].permute(2, 0, 1)[None])
    if gray:  # the mean of the three channels, rounded: (sum + 1) // 3, a band at a time
        for top in range(0, height, 256):
            band = pixels[top:top + 256, :, :3].sum(-1, dtype=torch.int16)
            pixels[top:top + 256, :, 0] = band.add_(1).div_(3, rounding_mode="floor")
        pixels = pixels[..., [0, 3]] if alpha is not None else pixels[..., :1]
    if alpha is not None:
        pixels[..., -1] = F.interpolate(alpha[None], scale_factor=scale, mode="bilinear",
                                        align_corners=False)[0, 0].mul_(255).round_().byte()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    array = pixels.numpy()
    with system.replaced_whole(out_path) as temporary:  # a full disk or Ctrl-C meanwhile leaves no partial PNG
        Image.fromarray(array[..., 0] if mode == "L" else np.ascontiguousarray(array), mode=mode).save(
            temporary, format="PNG", **options)
    return out_path


def plan(input_path, output, scale):
    """[(input file, output PNG)] for a file or every image of a folder (named _x<scale>); two inputs that would
    write one output (a.jpg and a.png) are refused before any work."""
    if os.path.isdir(input_path):
        out_dir = output or input_path.rstrip("/") + f"_x{scale}"
        jobs = [(p, os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + ".png"))
                for p in list_images(input_path)]
        sources = {}
        for source, out in jobs:
            if out in sources:
                raise DataError(f"{sources[out]} and {source} would both be written to {out}; rename one of them")
            sources[out] = source
        return jobs
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: no such file or folder")
    if not input_path.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{input_path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
    return [(input_path, output or os.path.splitext(input_path)[0] + f"_x{scale}.png")]


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "upscale", "reading", "system"))
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    system.bound_kernel_cache()
    device = system.pick_device(cfg["device"])
    if not cfg["input"]:
        raise SystemExit("error: give input=IMAGE_OR_FOLDER (and optionally output=PATH, checkpoint=PATH)")
    checkpoint = cfg["checkpoint"] or final_model()
    try:
        model, payload = load_model(checkpoint, device)
        if cfg["onnxruntime"] and device.type == "cpu":  # measured faster on an AVX2 CPU (README, Performance)
            model = OnnxModel(model, torch.get_num_threads())
        elif system.channels_last_helps(cfg["channels_last"], device):
            model = model.to(memory_format=torch.channels_last)
        scale = payload["config"]["scale"]
        jobs = plan(cfg["input"], cfg["output"], scale)
        if cfg["page"]:
            pages.check_out(cfg["page"])  # before the work
            for path, _ in jobs:  # the page holds each input whole, which max_pixels bounds: from the header, now
                with open_image(path, max_pixels=math.inf) as pil:
                    (width, height), limit = pil.size, cfg["max_pixels"]
                if width * height > limit:
                    raise DataError(f"{path}: {width}x{height} px is above max_pixels={limit}, and page= shows whole "
                                    "images: upscale it without page=")
    except (CheckpointError, DataError, pages.PageError) as err:
        raise SystemExit(f"error: {err}") from None
    for folder in sorted({os.path.dirname(out) or "." for _, out in jobs}):
        system.check_writable(folder)  # before the work, not after it
    margin = cfg["overlap"] or model.receptive_margin()
    for path, out_path in tqdm(jobs, unit="image", disable=len(jobs) == 1):
        try:
            with system.failed_writes_exit(out_path):
                written = upscale_file(model, path, out_path, scale, cfg["tile"], margin, cfg["ensemble"], device,
                                       cfg["max_pixels"])
            print(f"wrote {written}")
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
    if cfg["page"]:
        try:
            entries = pages.upscale_entries(jobs, payload, cfg["max_pixels"])
            print(f"wrote {pages.write_page(cfg['page'], f'x{scale} upscaling with {checkpoint}', entries, note='')}")
        except (DataError, pages.PageError) as err:
            raise SystemExit(f"error: {err}") from None
    return [out for _, out in jobs]


if __name__ == "__main__":
    main(sys.argv[1:])
