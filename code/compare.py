"""A comparison page to judge results by eye: for each image a slider between any two methods (HR, the LR input,
bilinear, bicubic, each checkpoint) with synchronised zoom and pan, pixels magnified without smoothing, and each
method's PSNR / SSIM for that image beside its name. One static folder (index.html and lossless PNGs) that opens
from file:// with no server and fetches nothing, since compute nodes and many laptops have no internet.

    python code/compare.py checkpoint=checkpoints/demo/model.pt          # data/eval -> runs/compare_eval_bilinear/
    python code/compare.py checkpoint=a.pt,b.pt eval_dir=data/Set5 degradation=bicubic_matlab out=runs/set5
    python code/compare.py checkpoint=... eval_dir=data/B100 crop=192     # 192x192 crops: a small page

On the page: drag the white line or press <- / -> to move the split, wheel or + / - to zoom, drag the image to
pan, 0 fits the image, f returns to the first view, n / p (PageDown / PageUp) step through the images. The first
view of each image is the square where the best model gains most over bicubic. upscale.py page=FOLDER writes
the same page for one's own photos (input | bicubic | model); other code calls write_page with method_images.
"""
import html
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from PIL import Image

import config
import evaluate
import system
from checkpoints import CheckpointError
from dataset import MAX_PIXELS, DataError, SRDataset, decode_image, to_float
from metrics import interpolate, psnr, ssim
from models import tiled_upscaler

PAGE_MARK = '<meta name="generator" content="sr-compare">'  # tells a page folder that may be replaced from any other
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
    scale, model_name = payload["config"]["scale"], evaluate.method_name(payload)
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
    probe = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        raise PageError(f"{out}: cannot write the page there ({err.strerror or err})") from None


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
    temporary = f"{out}.tmp{os.getpid()}"
    os.makedirs(os.path.join(temporary, "images"))
    try:
        with system.failed_writes_exit(out):  # a disk filling up meanwhile: one line, and the old page stays
            images = [write_images(temporary, index, entry) for index, entry in enumerate(entries)]
            if not images:
                raise PageError(f"{out}: no images to show")
            with open(os.path.join(temporary, "index.html"), "w", encoding="utf-8") as f:
                f.write(page_html(title, images, note))
            if os.path.lexists(out):
                old = f"{temporary}old"
                os.rename(out, old)
                os.rename(temporary, out)
                shutil.rmtree(old)
            else:
                os.rename(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return os.path.join(out, "index.html")


def page_html(title, images, note):
    data = json.dumps({"title": title, "images": images}, ensure_ascii=False, separators=(",", ":"))
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__NOTE__", html.escape(note))
            .replace("__DATA__", data.replace("<", "\\u003c")))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
""" + PAGE_MARK + """
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>__TITLE__</title>
<style>
  html, body { margin: 0; height: 100%; }
  body { display: flex; flex-direction: column; background: #1e1e1e; color: #e8e8e8;
         font: 14px/1.4 system-ui, sans-serif; }
  header, footer { padding: 6px 10px; display: flex; flex-wrap: wrap; gap: 6px 14px; align-items: center; }
  footer { color: #aaa; font-size: 12px; }
  select, button { font: inherit; }
  #view { position: relative; flex: 1; overflow: hidden; background: #101010; cursor: grab; touch-action: none;
          user-select: none; }
  .layer { position: absolute; inset: 0; overflow: hidden; }
  .layer img { position: absolute; max-width: none; image-rendering: pixelated; pointer-events: none; }
  #split { position: absolute; top: 0; bottom: 0; width: 24px; margin-left: -12px; cursor: ew-resize; }
  #split::before { content: ""; position: absolute; top: 0; bottom: 0; left: 11px; width: 2px; background: #fff; }
  #split::after { content: "\\2194"; position: absolute; top: 50%; left: 0; width: 24px; height: 24px;
                  margin-top: -12px; border-radius: 12px; background: #fff; color: #000; text-align: center; }
  .tag { position: absolute; top: 8px; padding: 2px 8px; background: rgba(0, 0, 0, 0.65); pointer-events: none;
         white-space: nowrap; }
  #left-tag { left: 8px; } #right-tag { right: 8px; }
</style>
</head>
<body>
<header>
  <button id="prev" title="previous image (p, PageUp)">&#9664;</button>
  <span id="counter"></span>
  <button id="next" title="next image (n, PageDown)">&#9654;</button>
  <strong id="name"></strong>
  <label>left <select id="left"></select></label>
  <label>right <select id="right"></select></label>
  <span id="zoom"></span>
  <span>__TITLE__</span>
</header>
<div id="view">
  <div class="layer" id="right-layer"><img id="right-img" alt="right method"></div>
  <div class="layer" id="left-layer"><img id="left-img" alt="left method"></div>
  <div id="split"></div>
  <div class="tag" id="left-tag"></div>
  <div class="tag" id="right-tag"></div>
</div>
<footer>
  <span>drag the line or &larr; / &rarr; (shift: finer): split</span>
  <span>wheel or + / &minus;: zoom</span><span>drag: pan</span><span>0: fit</span><span>f: first view</span>
  <span>n / p, PageDown / PageUp: next / previous image</span><span>__NOTE__</span>
</footer>
<script id="page-data" type="application/json">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("page-data").textContent);
const $ = (id) => document.getElementById(id);
const view = $("view"), SIDES = ["left", "right"], ZOOM_MAX = 64;
const state = {index: 0, left: null, right: null, split: 0.5, zoom: 1, cx: 0, cy: 0};  // cx, cy: image px at the centre

const current = () => DATA.images[state.index];
const clamp = (value, low, high) => Math.min(high, Math.max(low, value));
const label = (m) => m.psnr === null ? m.name : m.name + "  " + m.psnr.toFixed(2) + " dB / " + m.ssim.toFixed(4);
const fitZoom = () => Math.min(view.clientWidth / current().width, view.clientHeight / current().height);

function render() {
  const image = current(), width = view.clientWidth, height = view.clientHeight;
  for (const [key, side, viewSide] of [["cx", image.width, width], ["cy", image.height, height]]) {
    const half = viewSide / 2 / state.zoom;  // the image covers the view where it is large enough, else is centred
    state[key] = 2 * half >= side ? side / 2 : clamp(state[key], half, side - half);
  }
  const left = Math.round(width / 2 - state.cx * state.zoom), top = Math.round(height / 2 - state.cy * state.zoom);
  for (const side of SIDES) {
    const img = $(side + "-img");
    img.style.left = left + "px";
    img.style.top = top + "px";
    img.style.width = image.width * state.zoom + "px";
    img.style.height = image.height * state.zoom + "px";
  }
  const x = Math.round(state.split * width);
  $("left-layer").style.clipPath = "inset(0 " + (width - x) + "px 0 0)";
  $("split").style.left = x + "px";
  $("zoom").textContent = "zoom " + Math.round(state.zoom * 100) / 100 + "\\u00d7";
}

function zoomAt(factor, x, y) {  // keeps the image point under (x, y) of the view in place
  const zoom = clamp(state.zoom * factor, Math.min(1, fitZoom()), ZOOM_MAX);
  state.cx += (x - view.clientWidth / 2) * (1 / state.zoom - 1 / zoom);
  state.cy += (y - view.clientHeight / 2) * (1 / state.zoom - 1 / zoom);
  state.zoom = zoom;
  render();
}

function fit() {
  state.zoom = fitZoom();
  state.cx = current().width / 2;
  state.cy = current().height / 2;
  render();
}

function firstView() {  // the square where the best model gains most, magnified a whole number of times
  const focus = current().focus, zoom = Math.min(view.clientWidth, view.clientHeight) / focus.size;
  state.zoom = clamp(zoom >= 1 ? Math.floor(zoom) : zoom, Math.min(1, fitZoom()), ZOOM_MAX);
  state.cx = focus.x + focus.size / 2;
  state.cy = focus.y + focus.size / 2;
  render();
}

function useMethods() {
  const image = current();
  for (const side of SIDES) {
    const method = image.methods[Number($(side).value)];
    state[side] = method.name;
    $(side + "-img").src = method.src;
    $(side + "-tag").textContent = label(method);
  }
}

function show(index) {
  state.index = (index + DATA.images.length) % DATA.images.length;
  const image = current();
  for (const side of SIDES) {
    const names = image.methods.map((m) => m.name);
    $(side).replaceChildren(...image.methods.map((m, k) => new Option(label(m), String(k))));
    $(side).value = String(names.includes(state[side]) ? names.indexOf(state[side]) : names.indexOf(image[side]));
  }
  $("counter").textContent = (state.index + 1) + " / " + DATA.images.length;
  $("name").textContent = image.name;
  useMethods();
  firstView();
}

let drag = null;
view.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  drag = {split: event.target === $("split"), x: event.clientX, y: event.clientY};
  view.setPointerCapture(event.pointerId);
  event.preventDefault();
});
view.addEventListener("pointermove", (event) => {
  if (!drag) return;
  if (drag.split) {
    const box = view.getBoundingClientRect();
    state.split = clamp((event.clientX - box.left) / box.width, 0, 1);
  } else {
    state.cx -= (event.clientX - drag.x) / state.zoom;
    state.cy -= (event.clientY - drag.y) / state.zoom;
    drag.x = event.clientX;
    drag.y = event.clientY;
  }
  render();
});
for (const name of ["pointerup", "pointercancel"]) view.addEventListener(name, () => { drag = null; });
view.addEventListener("wheel", (event) => {
  event.preventDefault();
  const box = view.getBoundingClientRect();
  zoomAt(event.deltaY < 0 ? 1.25 : 0.8, event.clientX - box.left, event.clientY - box.top);
}, {passive: false});

for (const side of SIDES) $(side).addEventListener("change", () => { useMethods(); $(side).blur(); });
$("prev").addEventListener("click", () => show(state.index - 1));
$("next").addEventListener("click", () => show(state.index + 1));
window.addEventListener("resize", render);

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.tagName === "SELECT" && event.key.startsWith("Arrow")) return;  // the list's own keys
  const split = (step) => () => { state.split = clamp(state.split + step, 0, 1); render(); };
  const zoom = (factor) => () => zoomAt(factor, view.clientWidth / 2, view.clientHeight / 2);
  const actions = {
    ArrowLeft: split(event.shiftKey ? -0.01 : -0.05), ArrowRight: split(event.shiftKey ? 0.01 : 0.05),
    "+": zoom(2), "=": zoom(2), "-": zoom(0.5), "_": zoom(0.5), "0": fit, f: firstView,
    n: () => show(state.index + 1), PageDown: () => show(state.index + 1),
    p: () => show(state.index - 1), PageUp: () => show(state.index - 1),
  };
  if (actions[event.key]) {
    event.preventDefault();
    actions[event.key]();
  }
});

show(0);
</script>
</body>
</html>
"""


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "ckpt_dir", "eval_dir", "scale", "degradation", "input", "out",
                                  "runs_dir", "compare", "device"))
    device = system.pick_device(cfg["device"])
    eval_name = os.path.basename(os.path.normpath(cfg["eval_dir"]))
    out = cfg["out"] or os.path.join(cfg["runs_dir"], f"compare_{eval_name}_{cfg['degradation']}")
    title = f"x{cfg['scale']} on {eval_name}, LR made by {cfg['degradation']} downscaling"
    try:
        check_out(out)
        loaded = evaluate.load_models(cfg, device)
        names = [evaluate.method_name(payload) for _, _, payload in loaded]  # model.pt and model_raw.pt share one
        models = [(name if names.count(name) == 1 else f"{name}, {path}", model)
                  for name, (path, model, _) in zip(names, loaded)]
        dataset = SRDataset.from_config(cfg, train=False)
        page = write_page(out, title, method_images(dataset, models, device, cfg["crop"]))
    except (CheckpointError, DataError, PageError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {page}")
    return page


if __name__ == "__main__":
    main(sys.argv[1:])
