"""The comparison page, to judge results by eye: for each image a slider between any two methods (HR, the LR
input, bilinear, bicubic, each checkpoint) with synchronised zoom and pan, pixels magnified without smoothing, and
each method's PSNR / SSIM for that image beside its name. One static folder (index.html from compare.html, and
lossless PNGs) that opens from file:// with no server and fetches nothing, since compute nodes and many laptops
have no internet. compare.py writes it for an eval folder, upscale.py page=FOLDER for one's own photos, report.py
for Set14; other code calls write_page with method_images.
"""
import html
import json
import os

import torch
import torch.nn.functional as F
from PIL import Image

import system
from checkpoints import method_name
from dataset import MAX_PIXELS, decode_image, to_float
from metrics import interpolate, luma, psnr, ssim
from models import tiled_upscaler

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare.html")  # the page: HTML, CSS, JavaScript
PAGE_MARK = '<meta name="generator" content="sr-compare">'  # in compare.html: a page folder, which may be replaced
METRICS_NOTE = "PSNR / SSIM: of each whole image against HR, RGB in [0, 1], as evaluate.py computes them."


class PageError(ValueError):
    """An output folder or images that cannot make a page; the message says why in one line."""


def focus_window(gain, size=None):
    """The square of an HxW map where `gain` is largest on average: the page's first view. Its side is `size`, by
    default a quarter of the image's shorter side (at least 16 px), searched with a stride of a quarter of that side."""
    height, width = gain.shape
    size = min(height, width, size or max(16, min(height, width) // 4))
    stride = max(1, size // 4)
    means = F.avg_pool2d(gain[None, None].float(), size, stride)[0, 0]
    row, col = divmod(int(means.argmax()), means.shape[1])
    return {"x": col * stride, "y": row * stride, "size": size}


def detail_window(hr, side):
    """(top, left) of the side x side square of the CxHxW image `hr` (in [0, 1]) with the most edges (mean gradient
    magnitude of its luma, searched as focus_window searches): where an upscaler has something to recover, found
    from HR alone."""
    y = luma(hr * 255)
    window = focus_window((y[1:, :-1] - y[:-1, :-1]).abs() + (y[:-1, 1:] - y[:-1, :-1]).abs(), side)
    return window["y"], window["x"]


def crop_entry(entry, size, scale):
    """An entry of method_images cut to at most size x size HR px (multiples of `scale`) around its first view,
    so that a page of many or large images stays small; the scores stay those of the whole image."""
    height, width = entry["methods"][0][1].shape[-2:]
    focus = entry["focus"]
    spans = [max(scale, min(size, side) // scale * scale) for side in (height, width)]
    starts = [min(max(0, centre - span // 2), side - span) // scale * scale for centre, span, side in
              zip((focus["y"] + focus["size"] // 2, focus["x"] + focus["size"] // 2), spans, (height, width))]
    (top, left), (crop_height, crop_width) = starts, spans
    methods = []
    for name, image, scores in entry["methods"]:
        factor = height // image.shape[-2]  # 1 for HR-sized images, `scale` for the LR input
        methods.append((name, image[..., top // factor:(top + crop_height) // factor,
                                    left // factor:(left + crop_width) // factor], scores))
    side = min(focus["size"], crop_height, crop_width)
    return dict(entry, methods=methods, focus={"x": min(max(0, focus["x"] - left), crop_width - side),
                                               "y": min(max(0, focus["y"] - top), crop_height - side), "size": side})


@torch.inference_mode()
def method_images(dataset, models, device, crop=0):
    """Page entries for every image of `dataset` (an SRDataset with train=False: the LR made by its degradation,
    as evaluate.py makes it), one image at a time: HR, the LR input, bilinear, bicubic and each (name, model) of
    `models`, scored as evaluate.py scores them (metrics.psnr and ssim of the clamped output; their mean over the
    images is its table's). The first view is where the best model on that image gains most over bicubic."""
    for index, path in enumerate(dataset.files):
        low_res, high_res = (t[None].to(device) for t in dataset[index])
        outputs = [(mode, interpolate(low_res, dataset.scale, mode)) for mode in ("bilinear", "bicubic")]
        outputs += [(name, tiled_upscaler(model)(low_res).clamp(0, 1)) for name, model in models]
        scores = [{"psnr": psnr(output, high_res).item(), "ssim": ssim(output, high_res).item()} for _, output in outputs]
        best = max(range(2, len(outputs)), key=lambda k: scores[k]["psnr"]) if models else 0
        gain = ((outputs[1][1] - high_res) ** 2 - (outputs[best][1] - high_res) ** 2).sum(1)[0]
        entry = {"name": os.path.basename(path), "left": "bicubic", "right": outputs[best][0],
                 "methods": [("HR", high_res[0], None), ("LR input", low_res[0], None)]
                 + [(name, output[0], score) for (name, output), score in zip(outputs, scores)],
                 "focus": focus_window(gain)}
        yield crop_entry(entry, crop, dataset.scale) if crop else entry


@torch.inference_mode()
def upscale_entries(jobs, payload, max_pixels=MAX_PIXELS):
    """Page entries for upscale.py's (input file, upscaled PNG) pairs made with the checkpoint `payload`: the input,
    bicubic and the model's output (no HR, so no scores); the first view is where the model differs most from bicubic."""
    scale, model_name = payload["config"]["scale"], method_name(payload)
    for path, out_path in jobs:
        low_res = to_float(decode_image(path, max_pixels=max_pixels))
        output = to_float(decode_image(out_path, max_pixels=max_pixels * scale * scale))
        bicubic = interpolate(low_res[None], scale, "bicubic")[0]
        if output.shape != bicubic.shape:
            raise PageError(f"{out_path}: {output.shape[-1]}x{output.shape[-2]} px is not x{scale} of {path} "
                            f"({low_res.shape[-1]}x{low_res.shape[-2]} px)")
        yield {"name": os.path.basename(path), "left": "bicubic", "right": model_name,
               "methods": [("input", low_res, None), ("bicubic", bicubic, None), (model_name, output, None)],
               "focus": focus_window(((output - bicubic) ** 2).sum(0))}


def check_out(out):
    """Before any work: `out` must be new, empty or a page folder (it is replaced whole), and writable."""
    if os.path.lexists(out) and not (os.path.isdir(out) and (not os.listdir(out) or is_page(out))):
        raise PageError(f"{out}: exists and is not a comparison page, which would replace it; choose another folder")
    system.check_writable(os.path.dirname(os.path.abspath(out)))  # where its temporary folder goes


def is_page(folder):
    try:
        with open(os.path.join(folder, "index.html")) as f:
            return PAGE_MARK in f.read(1000)
    except (OSError, UnicodeDecodeError):
        return False


def save_png(image, path):
    """A CxHxW float image in [0, 1] (C = 1 or 3) as an 8-bit PNG (Pillow's PNG has no timestamp: same bytes)."""
    pixels = image.detach().clamp(0, 1).mul(255).round().byte().cpu().permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(path, format="PNG")


def write_images(folder, index, entry):
    """The PNGs of one entry under folder/images/, and its record for the page's data."""
    width = max(image.shape[-1] for _, image, _ in entry["methods"])
    height = max(image.shape[-2] for _, image, _ in entry["methods"])
    methods = []
    for number, (name, image, scores) in enumerate(entry["methods"]):
        factor = width // image.shape[-1]
        if image.shape[-1] * factor != width or image.shape[-2] * factor != height:
            raise PageError(f"{entry['name']}: '{name}' is {image.shape[-1]}x{image.shape[-2]} px, neither "
                            f"{width}x{height} px like the others nor a whole fraction of it")
        src = f"images/{index:03d}_{number}.png"
        save_png(image, os.path.join(folder, src))
        methods.append({"name": name, "src": src, "psnr": round(scores["psnr"], 4) if scores else None,
                        "ssim": round(scores["ssim"], 5) if scores else None})
    names = [m["name"] for m in methods]
    return {"name": entry["name"], "width": width, "height": height, "methods": methods,
            "left": entry["left"] if entry["left"] in names else names[0],
            "right": entry["right"] if entry["right"] in names else names[-1], "focus": entry["focus"]}


def write_page(out, title, entries, note=METRICS_NOTE):
    """Write the page for `entries` (an iterable of {"name", "methods": [(name, CxHxW float image in [0, 1],
    {"psnr", "ssim"} or None)], "left", "right": method names shown first, "focus": focus_window(...)}) into the
    folder `out`; returns the path of its index.html. Entries are consumed one at a time (memory stays that of one
    image), into a temporary folder renamed at the end, so a failure leaves no half-written page."""
    check_out(out)
    # a disk filling up meanwhile: one line, and the old page stays
    with system.failed_writes_exit(out), system.replaced_whole(out) as temporary:
        os.makedirs(os.path.join(temporary, "images"))
        images = [write_images(temporary, index, entry) for index, entry in enumerate(entries)]
        if not images:
            raise PageError(f"{out}: no images to show")
        with open(os.path.join(temporary, "index.html"), "w", encoding="utf-8") as f:
            f.write(page_html(title, images, note))
    return os.path.join(out, "index.html")


def page_html(title, images, note):
    """compare.html with the title, the note and the images' data (JSON, safe inside <script>) filled in."""
    with open(PAGE, encoding="utf-8") as f:
        template = f.read()
    data = json.dumps({"title": title, "images": images}, ensure_ascii=False, separators=(",", ":"))
    return (template.replace("__TITLE__", html.escape(title)).replace("__NOTE__", html.escape(note))
            .replace("__DATA__", data.replace("<", "\\u003c")))
