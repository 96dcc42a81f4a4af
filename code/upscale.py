"""Upscale your own images x2 with a trained checkpoint; by default the final model (FINAL_MODEL).

    python code/upscale.py input=photo.jpg                  # photo_x2.png, with checkpoints/final/model.pt
    python code/upscale.py checkpoint=checkpoints/residual/model.pt input=photo.jpg output=photo_x2.png
    python code/upscale.py input=folder/ output=out_folder/ ensemble=true
    python code/upscale.py input=photo.jpg page=photo_page      # + photo_page/index.html: input | bicubic | model

Any image the dataset reader accepts (PNG, JPEG, BMP, TIFF, ...; gray, palette, RGBA, 16-bit) is written
as an 8-bit PNG: gray stays gray, and an alpha channel is upscaled bilinearly and kept. Large images go
through the model in overlapping tiles, so memory stays bounded; with an overlap that covers the
model's receptive field the result equals that of the whole image at once.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import compare
import config
import system
from dataset import IMAGE_EXTENSIONS, MAX_PIXELS, DataError, decode_image, list_images, open_image, to_float
from checkpoints import CheckpointError, load_model
from models import self_ensemble, upscale_tiled

# the default checkpoint: the final model of README.pdf section 4, wherever the script is started from
FINAL_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "final", "model.pt")


def read_extras(path, scale, max_pixels):
    """What of the input the PNG keeps besides the pixels: the alpha channel (a 1xHxW float tensor in [0, 1],
    the right way up, or None) and the save options for the ICC colour profile and the resolution (DPI x scale,
    so that the printed size stays the same)."""
    with open_image(path, max_pixels) as pil:
        options = {"icc_profile": pil.info["icc_profile"]} if pil.info.get("icc_profile") else {}
        if "dpi" in pil.info:
            options["dpi"] = tuple(float(d) * scale for d in pil.info["dpi"])
        if pil.mode not in ("RGBA", "LA", "PA") and not (pil.mode == "P" and "transparency" in pil.info):
            return None, options
        alpha = np.asarray(ImageOps.exif_transpose(pil).convert("RGBA"))[..., 3]
    return torch.from_numpy(alpha.copy())[None].float() / 255, options


def upscale_file(model, path, out_path, scale, tile, margin, ensemble, device, max_pixels=MAX_PIXELS):
    image = decode_image(path, keep_gray=True, max_pixels=max_pixels)
    gray = image.shape[0] == 1
    low_res = to_float(image.expand(3, -1, -1))[None].to(device)
    tiles = len(range(0, low_res.shape[-2], tile)) * len(range(0, low_res.shape[-1], tile)) * (8 if ensemble else 1)
    with tqdm(total=tiles, unit="tile", desc=os.path.basename(path), leave=False) as progress:
        def upscale(x):
            return upscale_tiled(model, x, scale, tile, margin, progress, out_device="cpu")
        output = (self_ensemble(upscale) if ensemble else upscale)(low_res)[0]
    output = output.clamp_(0, 1).mul_(255).round_().byte()  # in place: the float image may be gigabytes
    channels = [output.float().mean(0, keepdim=True).round().byte()] if gray else [output]
    alpha, options = read_extras(path, scale, max_pixels)
    if alpha is not None:
        alpha = F.interpolate(alpha[None], scale_factor=scale, mode="bilinear", align_corners=False)[0]
        channels.append(alpha.mul_(255).round_().byte())
    pixels = torch.cat(channels).permute(1, 2, 0).numpy()
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode).save(out_path, **options)
    return out_path


def plan(input_path, output):
    """[(input file, output PNG)] for a file or every image of a folder."""
    if os.path.isdir(input_path):
        out_dir = output or input_path.rstrip("/") + "_x2"
        return [(p, os.path.join(out_dir, os.path.splitext(os.path.basename(p))[0] + ".png"))
                for p in list_images(input_path)]
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: no such file or folder")
    if not input_path.lower().endswith(IMAGE_EXTENSIONS):
        raise DataError(f"{input_path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
    return [(input_path, output or os.path.splitext(input_path)[0] + "_x2.png")]


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "upscale", "input", "system"))
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    device = system.pick_device(cfg["device"])
    if not cfg["input"]:
        raise SystemExit("error: give input=IMAGE_OR_FOLDER (and optionally output=PATH, checkpoint=PATH)")
    checkpoint = cfg["checkpoint"] or FINAL_MODEL
    if not cfg["checkpoint"] and not os.path.isfile(FINAL_MODEL):
        raise SystemExit(f"error: {FINAL_MODEL}: no such file yet (it is written when `python code/experiments.py "
                         "final` has finished); give checkpoint=PATH, e.g. checkpoints/residual_matlab/model.pt")
    try:
        model, payload = load_model(checkpoint, device)
        if system.channels_last_helps(cfg["channels_last"], device):
            model = model.to(memory_format=torch.channels_last)
        jobs = plan(cfg["input"], cfg["output"])
        if cfg["page"]:
            compare.check_out(cfg["page"])  # before the work
    except (CheckpointError, DataError, compare.PageError) as err:
        raise SystemExit(f"error: {err}") from None
    scale = payload["config"]["scale"]
    margin = cfg["overlap"] or model.receptive_margin()
    for path, out_path in tqdm(jobs, unit="image", disable=len(jobs) == 1):
        try:
            written = upscale_file(model, path, out_path, scale, cfg["tile"], margin, cfg["ensemble"], device,
                                   cfg["max_pixels"])
            print(f"wrote {written}")
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
    if cfg["page"]:
        try:
            entries = compare.upscale_entries(jobs, payload, cfg["max_pixels"])
            print(f"wrote {compare.write_page(cfg['page'], f'x{scale} upscaling with {checkpoint}', entries, note='')}")
        except (DataError, compare.PageError) as err:
            raise SystemExit(f"error: {err}") from None
    return [out for _, out in jobs]


if __name__ == "__main__":
    main(sys.argv[1:])
