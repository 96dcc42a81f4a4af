"""Figures: training curves read back from TensorBoard logs (the handout's Figure 3), grids of image crops and power spectra.
train.py draws each run's curves.png with them, report.py every figure of README.pdf.

    python code/plots.py run=demo    # writes runs/demo/curves.png
"""
import logging
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on cluster nodes and CI without a display
import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import system
from dataset import degrade
from metrics import LOGGED_L1, high_frequency_gap, power_ratio_db, psnr, ssim
from stats import number

logging.getLogger("tensorboard").addFilter(
    lambda record: not str(record.msg).startswith("Detected out of order event.step"))
# A panel: (tags drawn in it, title, log y axis)
PANELS = (((f"train/{LOGGED_L1}",), "train L1 (log scale)", True), ((f"val/{LOGGED_L1}",), "validation L1 (log scale)", True),
          (("val/psnr",), "validation PSNR (dB)", False), (("val/ssim",), "validation SSIM", False))
GAN_PANELS = (((f"train/{LOGGED_L1}",), "generator L1 (content)", False),
              (("train/adv",), "generator adversarial loss", False), (("train/d_loss",), "discriminator loss", False),
              (("train/d_real", "train/d_fake"), "D(real), D(fake)", False), (("val/psnr",), "validation PSNR (dB)", False),
              (("val/ssim",), "validation SSIM", False), (("val/sharpness",), "validation sharpness (1 = HR)", False))
# Training scalars are logged every few steps from one batch each: drawn as a moving mean over this many steps
SMOOTH_STEPS = 500
ERROR_GAIN = 4  # |error| maps are drawn 4x brighter
FIGURE_WIDTH = 7.2  # inches: the report's text width (A4 less 0.5 in borders), so fonts print at their own size


def use_report_style():
    """README.pdf's type sizes (8 pt at FIGURE_WIDTH, printed at their own size) and resolution, for report.py."""
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 7, "savefig.dpi": 150})


def read_scalars(run_dir):
    """{tag: ([steps], [values])} for every scalar logged in `run_dir`; a resumed run's last value per step wins."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()  # without TensorBoard's warning that a resumed run's restart purges the later events: expected
    scalars = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = sorted(by_step)
        scalars[tag] = (steps, [by_step[s] for s in steps])
    return scalars


def moving_mean(steps, values, window=SMOOTH_STEPS):
    """Each value replaced by the mean of the finite values logged in the `window` steps up to it."""
    smoothed, start = [], 0
    for i, step in enumerate(steps):
        while steps[start] <= step - window:
            start += 1
        finite = [v for v in values[start:i + 1] if math.isfinite(v)]
        smoothed.append(sum(finite) / len(finite) if finite else math.nan)
    return smoothed


def draw_curves(axes, curves, panels, references=None, x_max=None, y_limits=None, legend=(0, "upper right", 1)):
    """On each axis one panel (tags, title, log) of every curve (label, {tag: (steps, values)}); a curve keeps its
    colour in every panel. train/* tags are drawn as moving means over SMOOTH_STEPS steps. `references`:
    {tag: value}, a dashed horizontal line each, not in the legends (the captions say what they are); `y_limits`:
    {tag: (low, high)}; the curves' legend at `legend` = (panel index, location, columns)."""
    for axis, (tags, title, log) in zip(axes, panels):
        for index, (label, scalars) in enumerate(curves):
            for tag in tags:
                steps, values = scalars.get(tag, ([], []))
                if tag.startswith("train/") and len(steps) > 30:
                    values = moving_mean(steps, values)
                finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
                if finite:
                    name = label if len(tags) == 1 else f"{label} {tag.split('/')[-1]}".strip()
                    axis.plot(*zip(*finite), label=name, linewidth=1, color=f"C{(index * len(tags) + tags.index(tag)) % 10}",
                              marker="." if len(finite) < 30 else None)
        if tags[0] in (references or {}):
            axis.axhline(references[tags[0]], color="gray", linestyle="--", linewidth=1)
        axis.set(title=title, xlabel="step", yscale="log" if log else "linear", xlim=(0, x_max) if x_max else None)
        if y_limits and tags[0] in y_limits:
            axis.set_ylim(*y_limits[tags[0]])
        if log:  # labels 0.02 rather than 2 x 10^-2; within two decades also at 2, 3 and 5 times the powers of ten
            axis.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            low, high = axis.get_ylim()
            if high <= 100 * low:
                axis.yaxis.set_minor_locator(ticker.LogLocator(subs=(2, 3, 5)))
                axis.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        axis.grid(alpha=0.3)
        if axis is axes[legend[0]] and len(curves) > 1:  # the curves' legend once
            axis.legend(loc=legend[1], ncol=legend[2], framealpha=0.8)
        elif len(tags) > 1:  # a panel of several tags: their legend
            axis.legend(loc="best", framealpha=0.8)


def save_figure(figure, out_path, **layout):
    """tight_layout(**layout), then a PNG without the matplotlib version in it (the same bytes on rerun)."""
    figure.tight_layout(**layout)
    with system.replaced_whole(out_path) as temporary:
        figure.savefig(temporary, format="png", metadata={"Software": None})
    plt.close(figure)
    return out_path


def plot_curves(curves, out_path, panels, rows=1, width=FIGURE_WIDTH, height=2.3, **options):
    """`panels` of `curves` (see draw_curves) in `rows` rows; options go to draw_curves."""
    columns = -(-len(panels) // rows)
    figure, axes = plt.subplots(rows, columns, figsize=(width, height * rows), squeeze=False)
    draw_curves(list(axes.flat), curves, panels, **options)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    return save_figure(figure, out_path)


def plot_curve_rows(groups, out_path, panels):
    """One row of `panels` per (curves, x_max, references) of `groups`: runs of very different lengths each on a
    step axis of their own, each row with its own reference lines (see draw_curves) or None."""
    figure, axes = plt.subplots(len(groups), len(panels), figsize=(FIGURE_WIDTH, 2.0 * len(groups)), squeeze=False)
    for row, (curves, x_max, references) in zip(axes, groups):
        draw_curves(list(row), curves, panels, references=references, x_max=x_max)
    return save_figure(figure, out_path)


def plot_image_grid(cells, out_path, columns, cell_inches=None, title_size=9):
    """Images in a grid, each (title, HxWx3 uint8 array or None for an empty cell, text under it), drawn
    pixel for pixel enlarged without smoothing (nearest), so that what the models differ in is visible."""
    rows = -(-len(cells) // columns)
    side = cell_inches or FIGURE_WIDTH / columns
    figure, axes = plt.subplots(rows, columns, figsize=(side * columns, (side + 0.48) * rows), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, (title, pixels, under) in zip(axes.flat, cells):
        if pixels is None:
            continue
        axis.imshow(pixels, interpolation="nearest")
        axis.set_title(title, fontsize=title_size, pad=2)
        if under:
            axis.text(0.5, -0.02, under, fontsize=title_size - 0.5, ha="center", va="top", transform=axis.transAxes)
    return save_figure(figure, out_path, pad=0.2, h_pad=0.6, w_pad=0.3)


def plot_split(left, right, out_path, labels, height=4.4, window=None):
    """A whole image (CxHxW in [0, 1]) drawn pixel for pixel, its left half from `left` and its right half from
    `right` (two outputs for the same input), a line between them and `labels` (left, right) above; `window` = (top,
    left, side): a square outlined (where another figure's crop comes from)."""
    middle = left.shape[-1] // 2
    pixels = to_pixels(torch.cat([left[..., :middle], right[..., middle:]], -1))
    figure, axis = plt.subplots(figsize=(height * pixels.shape[1] / pixels.shape[0], height + 0.25))
    axis.imshow(pixels, interpolation="nearest")
    axis.axvline(middle - 0.5, color="white", linewidth=0.8)
    if window:
        axis.add_patch(plt.Rectangle((window[1] - 0.5, window[0] - 0.5), window[2], window[2], fill=False,
                                           edgecolor="yellow", linewidth=0.8))
    axis.set_axis_off()
    axis.set_title(f"{labels[0]}    |    {labels[1]}", fontsize=8, pad=3)
    return save_figure(figure, out_path, pad=0.1)


# ---- crops of model outputs, for plot_image_grid (README.pdf's image figures) ----

def to_pixels(image):
    """A CxHxW float image in [0, 1] as HxWx3 uint8, for plot_image_grid."""
    return image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def error_map(image, reference):
    """|image − reference| averaged over the colours, ERROR_GAIN x brighter, as a gray picture."""
    error = (image - reference).abs().mean(0, keepdim=True).mul(ERROR_GAIN).expand(3, -1, -1)
    return to_pixels(error)


def crop_scores(crop, reference):
    return f"{psnr(crop[None], reference[None]).item():.2f} dB / {ssim(crop[None], reference[None]).item():.3f}"


@torch.inference_mode()
def upscaled(upscale, hr, degradation, scale, device):
    """The method's output for the LR made from `hr` by `degradation`; upscale None = HR itself, "lr" = the LR
    input with its pixels enlarged."""
    if upscale is None:
        return hr
    low_res = degrade(hr, scale, degradation)[None].to(device)
    if upscale == "lr":
        return low_res[0].repeat_interleave(scale, -2).repeat_interleave(scale, -1).cpu()
    return upscale(low_res)[0].clamp(0, 1).float().cpu()


def crop_cells(hr, box, panels, scale, device, errors=False):
    """plot_image_grid cells of one crop, box = (top, left, side): each panel (label, degradation, upscale) with the
    crop's PSNR / SSIM (RGB) under it; with `errors` a second row of |error| maps."""
    top, left, side = box
    reference = hr[:, top:top + side, left:left + side]
    images, cells = [], []
    for label, degradation, upscale in panels:
        crop = upscaled(upscale, hr, degradation, scale, device)[:, top:top + side, left:left + side]
        images.append(crop)
        scored = upscale is not None and upscale != "lr"
        cells.append((label, to_pixels(crop), crop_scores(crop, reference) if scored else ""))
    if errors:  # under HR, the LR input the outputs were made from (the first model's degradation)
        degradation = next(d for _, d, upscale in panels if upscale not in (None, "lr"))
        low_res = upscaled("lr", hr, degradation, scale, device)[:, top:top + side, left:left + side]
        cells += [(f"|{label} − HR| ×{ERROR_GAIN}", error_map(crop, reference), "") if upscale not in (None, "lr")
                  else ("LR input, enlarged", to_pixels(low_res), "") for (label, _, upscale), crop in zip(panels, images)]
    return cells


def plot_spectra(hr, panels, scale, device, out_path, bins=32):
    """Each panel's (label, degradation, upscale) output power over HR's, in dB per ring of spatial frequency
    (metrics.power_ratio_db of the whole image; 0 dB = HR's), the upper half of the frequencies shaded;
    returns each output's metrics.high_frequency_gap, the mean over that half (below 0: smoother than HR)."""
    figure, axis = plt.subplots(figsize=(FIGURE_WIDTH * 0.5, 2.2))
    frequencies, gaps = (torch.arange(bins) + 0.5) * 0.5 / bins, []
    for label, degradation, upscale in panels:
        output = upscaled(upscale, hr, degradation, scale, device)
        gaps.append(high_frequency_gap(output, hr, bins).item())
        axis.plot(frequencies, power_ratio_db(output, hr, bins).clamp(min=-60), label=f"{label} ({number(gaps[-1], 1)} dB)")
    axis.axhline(0, color="gray", linestyle="--", linewidth=0.8)
    axis.axvspan(0.25, 0.5, color="gray", alpha=0.12, linewidth=0)
    axis.set(xlim=(0, 0.5), xlabel="spatial frequency (cycles per pixel)", ylabel="power / HR's (dB)")
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    save_figure(figure, out_path)
    return gaps


def plot_training_curves(run_dir, out_path):
    """A run's own curves.png: PANELS, or for a GAN run (one that logged train/adv) GAN_PANELS."""
    scalars = read_scalars(run_dir)
    panels = GAN_PANELS if "train/adv" in scalars else PANELS
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    label = os.path.basename(os.path.normpath(run_dir))
    return plot_curves([(label, scalars)], out_path, panels, rows=rows, width=4 * columns, height=3.2)


if __name__ == "__main__":
    import config

    cfg = config.from_argv(sys.argv[1:], ("run",))
    run_dir = os.path.join(cfg["runs_dir"], cfg["run"])
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: {run_dir}: no such run folder")
    print(f"wrote {plot_training_curves(run_dir, os.path.join(run_dir, 'curves.png'))}")
