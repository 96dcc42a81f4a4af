"""The report: README.pdf (and README.md's key-results block), made from the committed checkpoints and logs.

    python code/report.py               # make report: evaluate, plot, fill the template, render README.pdf
    python code/report.py device=cuda   # the same on a GPU (the numbers can differ in the last digits)
    python code/report.py pdf           # make pdf: render again after editing code/report.md's prose

Each run of code/experiments.py contributes its final checkpoints/<run>/model.pt, or while it is still
training its newest step*.pt (labelled "in progress"), and its TensorBoard scalars in runs/<run>/.
`build` computes every table, figure and number the prose quotes; code/report.md is the prose, with
`{{name}}` where they go. Outputs: runs/report/ (figures, tables, report.json with every block and value,
report.md as filled), README.md's `<!-- report:NAME -->` blocks, README.pdf. A rerun writes the same bytes.
"""
import functools
import json
import math
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches
import matplotlib.pyplot as plt
import torch

import config
import system
from checkpoints import RAW_WEIGHTS, load_checkpoint, load_model, step_checkpoints
from dataset import SRDataset, crop_to_multiple, decode_image, degrade, imresize_matlab, to_float
from experiments import ABLATION, DATA_ROOT, FINAL_RECIPE, RUNS
from metrics import LOSS_NAME, evaluate, evaluate_standard, interpolate, psnr, standard_set
from models import Discriminator, count_parameters, self_ensemble
from plots import read_scalars

EVAL_SETS = ("Set5", "Set14", "BSD68")  # Set5 validates (model selection); Set14 and BSD68 are the test sets
DOWNSCALING = ("bilinear", "bicubic", "nearest", "nearest_centred")  # how the LR input is made at test time
# Runs still training for the next report (issue 26: the 291-image model becomes `final` when the report is redone).
NOT_YET_REPORTED = {"final291"}
SCALE = 2  # the runs of experiments.RUNS, and the published results below, are x2
LAST = 10  # a run's level: mean and standard deviation of its last 10 validations (5,000 steps at val_every=500)
SWEEP_LAST = 5  # the 5,000-step sweep: its validations from step 3,000 on
PLATEAU_FRACTION, PLATEAU_DB = 0.2, 0.05
# Published x2 results of the standard protocol (Y channel, MATLAB bicubic LR, 2 px shaved border): name,
# parameters, training images, {set: (PSNR, SSIM)}. SRCNN 9-5-5 (Dong et al. 2016, TPAMI), FSRCNN (Dong et
# al. 2016, ECCV), VDSR (Kim et al. 2016, CVPR); none reports BSD68, a denoising subset of BSD300.
PUBLISHED = (("SRCNN", "57k", "395k", {"Set5": (36.66, 0.9542), "Set14": (32.42, 0.9063)}),  # ImageNet
             ("FSRCNN", "12k", "191", {"Set5": (37.00, 0.9558), "Set14": (32.63, 0.9088)}),  # T91 + General-100
             ("VDSR", "665k", "291", {"Set5": (37.53, 0.9587), "Set14": (33.03, 0.9124)}))  # T91 + BSD200
# Crops of the visual comparisons: (eval set, image, top, left, side) in HR pixels.
CROPS = {"comic": ("Set14", "comic.png", 40, 60, 96), "zebra": ("Set14", "zebra.png", 70, 300, 64),
         "butterfly": ("Set5", "butterfly.png", 90, 100, 96), "barbara": ("Set14", "barbara.png", 180, 380, 96)}
NAMES = {"baseline": "baseline (BasicSRModel)", "residual": "residual model", "gan": "GAN (residual generator)",
         "final": "final model", "residual_matlab": "residual_matlab (fine-tuned)"}
FIGURE_WIDTH = 7.2  # inches: the PDF's text width (A4 less 0.5 in borders), so fonts print at their own size
plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 8, "savefig.dpi": 150})
MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /report:(?P=name) -->)", re.S)
PLACEHOLDER = re.compile(r"\{\{([\w-]+)\}\}")
NEW_PAGE = "<!-- new page -->"  # in the template: the PDF starts a new page there
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.md")


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def mean_sd(values):
    """(mean, sample standard deviation) of a list; sd 0 for a single value, both NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


PM = "\u00a0±\u00a0"  # "a ± b" kept on one line in the PDF's narrow table columns


def pm(values, digits=2):
    if not values:  # e.g. a run that diverged before its first validation
        return "—"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}{PM}{sd:.{digits}f}"


def signed_pm(value, error):
    """A difference with its standard error, e.g. "+0.13 ± 0.01"."""
    return f"{value:+.2f}{PM}{error:.2f}"


def plateau(steps, values, fraction=PLATEAU_FRACTION, tolerance=PLATEAU_DB):
    """The convergence criterion: (gain, se, met). gain = mean validation PSNR over the last `fraction` of the
    steps minus the mean over the `fraction` before it; se its standard error (from the scatter within each
    window). Met when the curve rose by less than `tolerance` dB or by less than two standard errors."""
    last = steps[-1]
    recent = [v for s, v in zip(steps, values) if s > last * (1 - fraction)]
    before = [v for s, v in zip(steps, values) if last * (1 - 2 * fraction) < s <= last * (1 - fraction)]
    if len(recent) < 2 or len(before) < 2:
        return math.nan, math.nan, False
    gain = statistics.fmean(recent) - statistics.fmean(before)
    se = math.sqrt(statistics.variance(recent) / len(recent) + statistics.variance(before) / len(before))
    return gain, se, gain < tolerance or gain < 2 * se


class Run:
    """What the report needs of one experiment: its checkpoint, planned steps, and logs."""

    def __init__(self, name, settings, cfg):
        self.name = name
        planned = config.parse_overrides(settings)
        self.planned = planned["max_steps"]
        # the checkpoint a fine-tune started from, as experiments.RUNS names it now
        self.init = os.path.relpath(planned["init"], cfg["ckpt_dir"]) if planned["init"] else ""
        self.run_dir = os.path.join(cfg["runs_dir"], name)
        ckpt_dir = os.path.join(cfg["ckpt_dir"], name)
        final = os.path.join(ckpt_dir, "model.pt")
        newest = step_checkpoints(ckpt_dir)
        self.checkpoint = final if os.path.isfile(final) else (newest[0] if newest else None)
        self.scalars = read_scalars(self.run_dir) if os.path.isdir(self.run_dir) else {}
        self.summary = read_json(os.path.join(self.run_dir, "summary.json")) or {}
        self.train_config = read_json(os.path.join(self.run_dir, "config.json")) or {}
        self.payload = load_checkpoint(self.checkpoint) if self.checkpoint else {}  # step, elapsed, hardware
        self.step = self.payload.get("step")
        self.models = {}

    def series(self, tag, max_step=None):
        steps, values = self.scalars.get(tag, ([], []))
        kept = [(s, v) for s, v in zip(steps, values) if max_step is None or s <= max_step]
        return [s for s, _ in kept], [v for _, v in kept]

    def last(self, tag="val/psnr", count=LAST, max_step=None):
        """The last `count` logged values of `tag` up to `max_step`: what a run's level is averaged over."""
        return self.series(tag, max_step)[1][-count:]

    def diverged_at(self):
        steps, values = self.series(f"train/{LOSS_NAME}")
        return steps[-1] if values and not math.isfinite(values[-1]) else None

    def load(self, device):
        """The run's model on `device`, read once: several tables and figures use it."""
        if device not in self.models:
            self.models[device] = load_model(self.checkpoint, device)[0]
        return self.models[device]

    def status(self):
        if self.diverged_at() is not None:
            last = f"step {self.step}" if self.step is not None else "none"
            return f"diverged at step {self.diverged_at()}; last finite checkpoint: {last}"
        if self.step is None:  # started, logging, but not yet at its first checkpoint
            return "in progress: no checkpoint yet"
        return f"in progress: step {self.step:,} of {self.planned:,}" if self.step < self.planned else "done"

    def label(self):
        name = NAMES.get(self.name, self.name)
        if self.step is None or self.step >= self.planned:
            return name
        if self.diverged_at() is not None:
            return f"{name} [{self.status()}]"
        return f"{name} [step {self.step:,} of {self.planned:,}]"  # still training


def available_runs(cfg):
    """{name: Run} of the runs of experiments.RUNS that have logs or a checkpoint (a run that diverged
    before its first checkpoint has only logs: it appears in the plots and the runs table)."""
    runs = [Run(name, settings, cfg) for name, settings in RUNS if name not in NOT_YET_REPORTED]
    return {run.name: run for run in runs if run.checkpoint is not None or run.scalars}


class Scores:
    """evaluate() of each (method, set, degradation) once per report: the tables share many cells."""

    def __init__(self, device):
        self.device, self.results, self.datasets = device, {}, {}

    def dataset(self, set_name, degradation="bilinear"):
        if (set_name, degradation) not in self.datasets:
            self.datasets[set_name, degradation] = SRDataset(os.path.join(DATA_ROOT, set_name), scale=SCALE,
                                                             degradation=degradation, train=False)
        return self.datasets[set_name, degradation]

    def __call__(self, name, upscale, set_name, degradation="bilinear"):
        if (name, set_name, degradation) not in self.results:
            self.results[name, set_name, degradation] = evaluate(upscale, self.dataset(set_name, degradation),
                                                                 self.device)
        return self.results[name, set_name, degradation]


def upsampling(mode):
    """(label, upscale) of plain interpolation: the baseline every model has to beat."""
    return f"{mode} upsampling", lambda lr: interpolate(lr, SCALE, mode)


def interpolations():
    return [upsampling("bilinear"), upsampling("bicubic")]


def methods(runs, device):
    """(label, upscale) of the interpolation baselines, then of each run's model."""
    return interpolations() + [(run.label(), run.load(device)) for run in runs if run.checkpoint]


def table(header, align, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def cell(metrics, keys=("psnr", "ssim")):
    return " / ".join(f"{metrics[k]:.2f}" if k == "psnr" else f"{metrics[k]:.3f}" if k == "sharpness"
                      else f"{metrics[k]:.4f}" for k in keys)


def runs_table(runs):
    """Steps, wall time, hardware, level of the validation PSNR and the plateau criterion of every run."""
    rows = []
    for run in runs:
        steps, psnrs = run.series("val/psnr")
        fine_tune = bool(run.init)
        long_run = not fine_tune and run.planned > 5000  # a verdict for the long runs only
        gain, se, met = plateau(steps, psnrs) if steps and long_run else (math.nan, math.nan, False)
        status = run.status()
        if status == "done" and not math.isnan(gain):
            status = "plateau" if met else "still rising"
        elapsed = run.summary.get("wall_time_s", run.payload.get("elapsed"))
        hardware = run.summary.get("hardware") or run.payload.get("hardware", "—")
        model = run.train_config.get("model", "—") + (f" from {run.init}" if fine_tune else "")
        count = min(len(psnrs), LAST if run.planned > 5000 else SWEEP_LAST)
        rows.append([run.name, model, f"{run.train_config.get('lr', math.nan):g}", "—" if run.step is None else
                     f"{run.step:,}", "—" if elapsed is None else f"{elapsed / 3600:.2f} h", short_hardware(hardware),
                     pm(psnrs[-count:]),
                     "—" if math.isnan(gain) else signed_pm(gain, se), status])
    return table(["run", "model", "lr", "steps", "wall time", "hardware", "val PSNR (dB)",
                  "gain, last 20% (dB)",
                  "status"], ["---", "---", "---:", "---:", "---:", "---", "---:", "---:", "---"], rows)


def short_hardware(text):
    return text.replace("Intel(R) Xeon(R) Processor", "Xeon").replace(", 2 threads", "").replace(" autocast", "")


def key_table(runs, scores):
    """Table 1: the models against interpolation on every set, the handout's protocol (RGB, bilinear LR)."""
    rows = [[name] + [cell(scores(name, upscale, s)) for s in EVAL_SETS]
            for name, upscale in methods(runs, scores.device)]
    return table(["method", "Set5 (validation)", "Set14 (test)", "BSD68 (test)"], ["---", "---:", "---:", "---:"],
                 rows)


def gap_table(baseline, residual, scores):
    """Baseline vs residual: Set5 averaged over the last validations, the test sets at the final checkpoints."""
    level = [baseline.last(), residual.last()]
    gap = [r - b for b, r in zip(*level)]
    first = baseline.series("val/psnr")[0][-len(level[0])]
    rows = [[f"Set5 validation, mean ± sd of steps {first:,}–{baseline.step:,}", pm(level[0]), pm(level[1]), pm(gap)],
            [f"Set5 validation, range over the same steps", f"{min(level[0]):.2f}–{max(level[0]):.2f}",
             f"{min(level[1]):.2f}–{max(level[1]):.2f}", f"{min(gap):.2f}–{max(gap):.2f}"]]
    for set_name in EVAL_SETS[1:]:
        cells = [scores(run.label(), run.load(scores.device), set_name)["psnr"] for run in (baseline, residual)]
        rows.append([f"{set_name} test, step {baseline.step:,} only", f"{cells[0]:.2f}", f"{cells[1]:.2f}",
                     f"{cells[1] - cells[0]:+.2f}"])
    return table(["PSNR (dB)", "baseline", "residual", "residual − baseline"], ["---", "---:", "---:", "---:"], rows)


def sweep_runs(runs):
    return [runs[n] for n, _ in RUNS if n.startswith("lr_") and n in runs]


def sweep_table(runs):
    """Each learning rate's validation PSNR over its last 5 validations and its final training L1."""
    rows = []
    for run in [*sweep_runs(runs), runs.get("baseline")]:
        if run is None:
            continue
        lr = run.train_config["lr"]
        psnrs = run.last(count=SWEEP_LAST, max_step=5000)
        losses = run.last(f"train/{LOSS_NAME}", count=10, max_step=5000)
        note = "the baseline's first 5,000 steps" if run.name == "baseline" else run.status()
        finite = losses and all(math.isfinite(v) for v in losses)
        rows.append((lr, [f"{lr:g}", pm(psnrs), spread(psnrs), f"{statistics.fmean(losses):.4f}" if finite else "not finite",
                          note]))
    return table(["lr", "val PSNR, steps 3,000–5,000 (dB)", "range", "train L1, last 500 steps", "note"],
                 ["---:", "---:", "---:", "---:", "---"], [row for _, row in sorted(rows, reverse=True)])


def downscaling_table(runs, scores):
    """PSNR / SSIM with LR inputs made by other downscaling than the bilinear one of training."""
    rows = []
    for set_name in EVAL_SETS:
        for name, upscale in methods(runs, scores.device):
            rows.append([set_name, name] + [cell(scores(name, upscale, set_name, d)) for d in DOWNSCALING])
    return table(["set", "method"] + [f"LR by {d.replace('_', ' ')}" for d in DOWNSCALING],
                 ["---", "---"] + ["---:"] * len(DOWNSCALING), rows)


def gan_table(gan, start, residual, scores):
    """PSNR, SSIM and sharpness (metrics.sharpness) of the GAN against the checkpoint it started from."""
    rows = []
    for name, run, upscale, max_step in [("bicubic upsampling", None, upsampling("bicubic")[1], None),
                                         (f"{start[0]} (GAN's start)", residual, start[1], start[2]),
                                         (gan.label(), gan, gan.load(scores.device), None)]:
        if run is None:
            val = "—"
        else:
            psnrs, sharps = run.last(max_step=max_step), run.last("val/sharpness", max_step=max_step)
            val = f"{pm(psnrs)} / {pm(sharps, 3)}"
        rows.append([name, val] + [cell(scores(name, upscale, s), ("psnr", "ssim", "sharpness")) for s in EVAL_SETS[1:]])
    return table(["method", "Set5 val PSNR / sharpness, last 10", "Set14 PSNR / SSIM / sharpness",
                  "BSD68 PSNR / SSIM / sharpness"], ["---", "---:", "---:", "---:"], rows)


def standard_rows(runs, device):
    """(method, kind, parameters, training images, upscale) of the standard-protocol table."""
    rows = [("bicubic (MATLAB imresize)", "—", "—", "—", lambda lr: imresize_matlab(lr, SCALE))]
    for name in ("residual_matlab", "final"):
        if name in runs and runs[name].checkpoint:
            model = runs[name].load(device)
            params = f"{count_parameters(model) / 1000:.0f}k"
            rows.append((runs[name].label(), "single model", params, "91", model))
            if name == "final":
                rows.append((runs[name].label(), "x8 self-ensemble", params, "91", self_ensemble(model)))
    return rows


def standard_table(runs, device):
    """x2 in the SR papers' protocol (metrics.evaluate_standard) beside published results; also returns the
    per-image scores as {("<method>, <kind>", set): [metrics of each image]} for the prose."""
    scores, rows = {}, []
    for label, kind, params, data, upscale in standard_rows(runs, device):
        for set_name in EVAL_SETS:
            scores[f"{label}, {kind}", set_name] = per_image_standard(upscale, set_name, device)
        rows.append([label, kind, params, data, *[cell(average(scores[f"{label}, {kind}", s])) for s in EVAL_SETS]])
    for name, params, data, values in PUBLISHED:
        rows.append([f"{name} (published)", "single model", params, data,
                     *[f"{values[s][0]:.2f} / {values[s][1]:.4f}" if s in values else "—" for s in EVAL_SETS]])
    return table(["method", "inference", "parameters", "training images", "Set5", "Set14", "BSD68"],
                 ["---", "---", "---:", "---:", "---:", "---:", "---:"], rows), scores


@functools.lru_cache(maxsize=None)
def standard_images(folder):
    """The HR images of a standard set, decoded once per report (every model of Tables 6 and 7 uses them)."""
    return standard_set(folder, SCALE)


def per_image_standard(upscale, set_name, device):
    """Standard-protocol metrics of each image of `set_name`: paired differences between models need them."""
    images = standard_images(os.path.join(DATA_ROOT, set_name))
    return [evaluate_standard(upscale, [image], SCALE, device) for image in images]


def average(per_image):
    """The set's metrics: per-image values summed in order, as evaluate_standard does for a whole set."""
    return {key: sum(m[key] for m in per_image) / len(per_image) for key in ("psnr", "ssim")}


def paired(after, before):
    """Mean ± standard error over images of the per-image PSNR differences `after - before`."""
    mean, sd = mean_sd([a["psnr"] - b["psnr"] for a, b in zip(after, before)])
    return signed_pm(mean, sd / math.sqrt(len(after)))


def ablation_table(runs, device):
    """The ablation runs at equal steps, each adding settings to the one before: the Set5 validation level and
    the standard protocol on the test sets, with each step's gain as a paired difference over the images."""
    present = [(name, settings, runs[name]) for name, settings in ABLATION if name in runs and runs[name].checkpoint]
    if not present:
        return "*The ablation runs (`python code/experiments.py ablate_handout ...`) have not been trained yet.*\n", {}
    test_sets, rows, before, first, added_before = EVAL_SETS[1:], [], None, None, []
    values = {"ablation_steps": f"{present[0][2].planned:,}"}
    for name, settings, run in present:
        model = run.load(device)
        scores = {s: per_image_standard(model, s, device) for s in test_sets}
        added = ", ".join(f"`{setting}`" for setting in settings if setting not in added_before) or "—"
        added_before = settings
        cells = []
        for s in test_sets:
            if before:
                values[f"{name}_gain_{s}"] = paired(scores[s], before[s])
            cells += [f"{average(scores[s])['psnr']:.2f}", values.get(f"{name}_gain_{s}", "—")]
        rows.append([name if run.status() == "done" else f"{name} [{run.status()}]", added,
                     pm(run.last(count=3)), *cells])
        before, first = scores, first or scores
    for s in test_sets:
        values[f"ablation_total_{s}"] = paired(before[s], first[s]) if len(present) > 1 else "—"
    return table(["run", "adds", "Set5 val (RGB), last 3", "Set14", "Δ Set14", "BSD68", "Δ BSD68"],
                 ["---", "---", "---:", "---:", "---:", "---:", "---:"], rows), values


def save_figure(figure, out_path, **layout):
    """tight_layout(**layout), then a PNG without the matplotlib version in it (the same bytes on rerun)."""
    figure.tight_layout(**layout)
    figure.savefig(out_path, metadata={"Software": None})
    plt.close(figure)
    return out_path


def plot_curves(runs, out_path, panels, max_step=None, labels=None, references=None, rows=1, x_max=None):
    """Logged scalars of several runs on shared axes, one panel per (tag, title, log y); `references`:
    {tag: [(label, value)]} drawn as dashed horizontal lines (e.g. bicubic upsampling on the validation set)."""
    columns = -(-len(panels) // rows)
    figure, axes = plt.subplots(rows, columns, figsize=(FIGURE_WIDTH, 2.3 * rows), squeeze=False)
    draw_curves(list(axes.flat), runs, panels, max_step, labels, references, x_max)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    return save_figure(figure, out_path)


def plot_curve_rows(groups, out_path, panels, references=None):
    """One row of `panels` per (runs, x_max) of `groups`: runs of very different lengths each on a step axis
    of their own, e.g. the final run and its short ablation runs."""
    figure, axes = plt.subplots(len(groups), len(panels), figsize=(FIGURE_WIDTH, 2.4 * len(groups)), squeeze=False)
    for row, (runs, x_max) in zip(axes, groups):
        draw_curves(list(row), runs, panels, references=references, x_max=x_max)
    return save_figure(figure, out_path)


def draw_curves(axes, runs, panels, max_step=None, labels=None, references=None, x_max=None):
    for axis, (tag, title, log) in zip(axes, panels):
        for index, run in enumerate(runs):  # a run keeps its colour in every panel, even where others log nothing
            steps, values = run.series(tag, max_step)
            finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
            if finite:
                axis.plot(*zip(*finite), label=(labels or {}).get(run.name, run.name), linewidth=1, color=f"C{index % 10}",
                          marker="." if len(finite) < 30 else None)
        lines = [axis.axhline(value, color="gray", linestyle=style, linewidth=1, label=label)
                 for (label, value), style in zip((references or {}).get(tag, []), ("--", ":", "-."))]
        axis.set(title=title, xlabel="step", yscale="log" if log else "linear", xlim=(0, x_max) if x_max else None)
        axis.grid(alpha=0.3)
        if axis is axes[0] and len(runs) > 1 or lines:  # the runs' legend once, references where drawn
            axis.legend(handles=None if axis is axes[0] and len(runs) > 1 else lines)


def high_res(crop_name):
    set_name, file_name = CROPS[crop_name][:2]
    return crop_to_multiple(to_float(decode_image(os.path.join(DATA_ROOT, set_name, file_name))), SCALE)


@torch.inference_mode()
def plot_crops(crop_name, panels, out_path, device, thumbnail=True):
    """One crop of an image, three to a row, large: a thumbnail with the crop boxed (when `thumbnail`), then
    each panel (label, degradation, upscale), its PSNR against the HR crop printed under it; upscale None = HR,
    "lr" = the LR input with its pixels enlarged."""
    set_name, file_name, top, left, side = CROPS[crop_name]
    hr = high_res(crop_name)
    reference = hr[:, top:top + side, left:left + side]
    cells = len(panels) + thumbnail
    rows = -(-cells // 3)
    figure, axes = plt.subplots(rows, 3, figsize=(FIGURE_WIDTH, (FIGURE_WIDTH / 3 + 0.45) * rows), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    if thumbnail:
        axes[0, 0].imshow(hr.permute(1, 2, 0).numpy())
        axes[0, 0].add_patch(matplotlib.patches.Rectangle((left, top), side, side, fill=False, color="red", linewidth=1.5))
        axes[0, 0].set_title(f"{set_name}/{file_name}, {side}x{side} crop", fontsize=8)
    for axis, (label, degradation, upscale) in zip(list(axes.flat)[thumbnail:], panels):
        low_res = degrade(hr, SCALE, degradation)[None].to(device)
        if upscale is None:
            image = hr[None]
        elif upscale == "lr":
            image = low_res.repeat_interleave(SCALE, -2).repeat_interleave(SCALE, -1)
        else:
            image = upscale(low_res).clamp(0, 1)
        crop = image[0, :, top:top + side, left:left + side].float().cpu()
        axis.imshow(crop.mul(255).round().byte().permute(1, 2, 0).numpy(), interpolation="nearest")
        axis.set_title(label, fontsize=8)
        if upscale is not None:
            axis.text(0.5, -0.02, f"PSNR of the crop {psnr(crop[None], reference[None]).item():.2f} dB", fontsize=8,
                      ha="center", va="top", transform=axis.transAxes)
    return save_figure(figure, out_path, pad=0.2, h_pad=0.8)


def figure_block(path, caption):
    return f"![{caption}]({path})\n\n*{caption}*\n"


def fine_tune_start(run, cfg, device):
    """(label, model, step) of the checkpoint a fine-tune started from (the residual run has trained on since)."""
    path = os.path.join(cfg["ckpt_dir"], run.init)
    model, payload = load_model(path, device)
    return f"residual, step {payload['step']:,}", model, payload["step"]


def spread(values, digits=2):
    """'a–b' of a few numbers, or the one number when they agree to `digits`."""
    if not values:
        return "—"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}–{high}"


def baseline_values(runs, scores):
    """The numbers the Task 5 prose quotes about the baseline, the residual model and convergence."""
    values = {}
    for name in ("baseline", "residual"):
        run = runs[name]
        gain, se, met = plateau(*run.series("val/psnr"))
        values.update({f"{name}_level": pm(run.last()), f"{name}_gain": signed_pm(gain, se),
                       f"{name}_plateau": "met" if met else "not met", f"{name}_final_val": f"{run.last()[-1]:.2f}",
                       f"{name}_steps": f"{run.step:,}", f"{name}_start_val": f"{run.series('val/psnr')[1][0]:.2f}"})
        for set_name in EVAL_SETS[1:]:
            values[f"{name}_{set_name}"] = f"{scores(run.label(), run.load(scores.device), set_name)['psnr']:.2f}"
    gaps = [r - b for b, r in zip(runs["baseline"].last(), runs["residual"].last())]
    values["gap_set5"] = pm(gaps)
    values["gap_set5_range"] = spread(gaps)
    values["gap_tests"] = spread([float(values[f"residual_{s}"]) - float(values[f"baseline_{s}"]) for s in EVAL_SETS[1:]])
    level = statistics.fmean(runs["baseline"].last())
    values["baseline_final_below_level"] = f"{level - runs['baseline'].last()[-1]:.2f}"
    steps, psnrs = runs["baseline"].series("val/psnr")
    recent = [v for s, v in zip(steps, psnrs) if s >= steps[-1] - 10000]
    values["baseline_jump"] = f"{max(abs(b - a) for a, b in zip(recent, recent[1:])):.2f}"
    values["gap_set5_min"] = f"{min(gaps):.2f}"
    values["parameters"] = f"{count_parameters(runs['residual'].load(scores.device)):,}"
    values["bicubic_set5"] = f"{scores(*upsampling('bicubic'), 'Set5')['psnr']:.2f}"
    values["bilinear_set5"] = f"{scores(*upsampling('bilinear'), 'Set5')['psnr']:.2f}"
    return values


def sweep_values(runs):
    values = {}
    for run in [*sweep_runs(runs), runs["baseline"]]:
        key = "lr_1e-4" if run.name == "baseline" else run.name
        psnrs = run.last(count=SWEEP_LAST, max_step=5000)
        values[key] = pm(psnrs)
        values[f"{key}_range"] = spread(psnrs)
        values[f"{key}_sd"] = f"{mean_sd(psnrs)[1]:.2f}"
    if "lr_1e-3" in runs:
        means = [mean_sd(run.last(count=SWEEP_LAST, max_step=5000))[0] for run in (runs["baseline"], runs["lr_1e-3"])]
        values["lr_gap"] = f"{means[0] - means[1]:.2f}"
    if "lr_1e-2" in runs:
        values["lr_1e-2_peak_loss"] = f"{max(runs['lr_1e-2'].series(f'train/{LOSS_NAME}')[1]):.0f}"
    return values


def signed_range(values):
    return f"{min(values):+.2f} to {max(values):+.2f} dB"


def downscaling_values(runs, scores):
    """How much each model loses on other LR inputs: to bicubic, to nearest, and nearest's loss split into its
    half-pixel shift (nearest -> nearest_centred) and aliasing (nearest_centred -> bilinear)."""
    values = {}
    bicubic = upsampling("bicubic")
    for name, upscale in methods(runs, scores.device)[2:]:
        key = name.split(" ")[0]
        db = {(s, d): scores(name, upscale, s, d)["psnr"] for s in EVAL_SETS for d in DOWNSCALING}
        for d in ("bicubic", "nearest"):  # the model against bicubic upsampling of the same input
            values[f"{key}_vs_interpolation_{d}"] = signed_range([db[s, d] - scores(*bicubic, s, d)["psnr"]
                                                                  for s in EVAL_SETS])
        for label, (good, bad) in {"bicubic": ("bilinear", "bicubic"), "nearest": ("bilinear", "nearest"),
                                   "shift": ("nearest_centred", "nearest"),
                                   "alias": ("bilinear", "nearest_centred")}.items():
            values[f"{key}_loss_{label}"] = spread([db[s, good] - db[s, bad] for s in EVAL_SETS], 1)
    for mode, upscale in interpolations():
        key = mode.split(" ")[0]
        db = {(s, d): scores(mode, upscale, s, d)["psnr"] for s in EVAL_SETS for d in DOWNSCALING}
        values[f"{key}_gain_bicubic"] = spread([db[s, "bicubic"] - db[s, "bilinear"] for s in EVAL_SETS], 1)
        values[f"{key}_shift"] = spread([db[s, "nearest_centred"] - db[s, "nearest"] for s in EVAL_SETS], 1)
    return values


def gan_values(gan, start, residual, scores):
    values = {"gan_steps": f"{gan.step:,}", "gan_start_step": f"{start[2]:,}",
              "adv_weight": f"{gan.train_config['adv_weight']:g}",
              "discriminator_parameters": f"{count_parameters(Discriminator()):,}"}
    for set_name in EVAL_SETS[1:]:
        before = scores(f"{start[0]} (GAN's start)", start[1], set_name)
        after = scores(gan.label(), gan.load(scores.device), set_name)
        values[f"gan_cost_{set_name}"] = f"{before['psnr'] - after['psnr']:.2f}"
        values[f"gan_sharp_{set_name}"] = f"{after['sharpness']:.3f} against {before['sharpness']:.3f}"
    values["gan_val"] = pm(gan.last())
    values["gan_val_range"] = spread(gan.last())
    values["gan_val_sharp"] = pm(gan.last("val/sharpness"), 3)
    values["gan_start_val"] = pm(residual.last(max_step=start[2]))
    values["gan_start_val_sharp"] = pm(residual.last("val/sharpness", max_step=start[2]), 3)
    d_loss = gan.series("train/d_loss")[1]
    values["gan_d_loss"] = spread(d_loss[len(d_loss) // 2:])
    return values


def thousands(text):
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


def recipe_values():
    """The published models' range of sizes and the final recipe's settings, quoted in the prose."""
    values = {f"recipe_{key}": text for key, _, text in (s.partition("=") for s in FINAL_RECIPE)}
    for column, key in ((1, "params"), (2, "images")):
        low, high = (sorted(PUBLISHED, key=lambda row: thousands(row[column]))[i] for i in (0, -1))
        values[f"published_{key}"] = f"{low[column]} ({low[0]}) to {high[column]} ({high[0]})"
    return values


def final_values(runs, standard):
    final = runs["final"]
    values = {"final_step": f"{final.step:,}", "final_planned": f"{final.planned:,}", "final_status": final.status()}
    gain, se, met = plateau(*final.series("val/psnr"))
    values["final_gain"] = signed_pm(gain, se)
    values["final_trend"] = f"rising by less than {PLATEAU_DB} dB" if met else "still rising"
    values["final_hours"] = f"{final.summary.get('wall_time_s', final.payload.get('elapsed', 0)) / 3600:.1f}"
    values["final_hardware"] = final.summary.get("hardware", final.payload.get("hardware", "not recorded"))
    for name, _, _, published in PUBLISHED:
        values[name] = " / ".join(f"{published[s][0]:.2f}" for s in ("Set5", "Set14"))
    values["final_val"] = f"{final.last()[-1]:.2f}"
    values["final_val_level"] = pm(final.last())
    matlab = runs.get("residual_matlab")
    for set_name in EVAL_SETS:
        single, x8 = (standard[f"{final.label()}, {kind}", set_name] for kind in ("single model", "x8 self-ensemble"))
        values[f"final_{set_name}_single"] = f"{average(single)['psnr']:.2f}"
        values[f"final_{set_name}_x8"] = f"{average(x8)['psnr']:.2f}"
        values[f"final_x8_gain_{set_name}"] = paired(x8, single)
        if matlab and matlab.checkpoint:
            values[f"final_vs_matlab_{set_name}"] = paired(single, standard[f"{matlab.label()}, single model", set_name])
        for name, _, _, published in PUBLISHED[1:]:  # FSRCNN, VDSR
            if set_name in published:
                margin = average(single)["psnr"] - published[set_name][0]
                values[f"final_vs_{name.lower()}_{set_name}"] = f"{margin:+.2f}"
    return values


def moving_average_values(final, standard, device):
    """What the moving average adds at the end of the final run: its averaged weights (model.pt) against the
    last step's own weights (model_raw.pt, saved beside it), paired per image of each set."""
    path = os.path.join(os.path.dirname(final.checkpoint), RAW_WEIGHTS)
    if not os.path.isfile(path):
        return {f"final_ema_gain_{set_name}": f"not measured (no {RAW_WEIGHTS})" for set_name in EVAL_SETS}
    raw = load_model(path, device)[0]
    return {f"final_ema_gain_{set_name}": paired(standard[f"{final.label()}, single model", set_name],
                                                 per_image_standard(raw, set_name, device)) for set_name in EVAL_SETS}


LOSS_PANELS = [(f"train/{LOSS_NAME}", "train L1 (log scale)", True), (f"val/{LOSS_NAME}", "validation L1 (Set5)", True),
               ("val/psnr", "validation PSNR on Set5 (dB)", False), ("val/ssim", "validation SSIM on Set5", False)]
GAN_PANELS = [(f"train/{LOSS_NAME}", "generator L1 (log scale)", True), ("train/adv", "generator adversarial loss", False),
              ("train/d_loss", "discriminator loss", False), ("val/psnr", "validation PSNR on Set5 (dB)", False),
              ("val/ssim", "validation SSIM on Set5", False), ("val/sharpness", "validation sharpness (1 = HR)", False)]


class Output:
    """The report as it is made: tables (.md) and figures (.png) written to `out_dir`, {block: markdown} and
    {value: text} for the prose. `only` (a set of block names) limits the work, for tests."""

    def __init__(self, out_dir, only=None):
        self.out_dir, self.only, self.blocks, self.values = out_dir, only, {}, {}
        os.makedirs(out_dir, exist_ok=True)

    def want(self, name):
        return self.only is None or name in self.only

    def table(self, name, make):
        """make() returns the table's markdown, or (markdown, {value: text}) with the numbers the prose quotes."""
        if self.want(name):
            made = make()
            self.blocks[name], values = made if isinstance(made, tuple) else (made, {})
            self.values.update(values)
            with open(os.path.join(self.out_dir, f"{name}.md"), "w") as f:
                f.write(self.blocks[name])

    def figure(self, name, caption, make):
        if self.want(name):
            path = os.path.join(self.out_dir, f"{name}.png")
            make(path)
            self.blocks[name] = figure_block(os.path.relpath(path), caption)


def bicubic_reference(scores, degradation="bilinear"):
    """{tag: [(label, value)]}: bicubic upsampling on Set5, the dashed line of the validation PSNR panels."""
    return {"val/psnr": [("bicubic upsampling", scores(*upsampling("bicubic"), "Set5", degradation)["psnr"])]}


def baseline_and_residual(out, runs, scores):
    """Task 5: the baseline's curves (handout Figure 3), the residual model against it, Figure 2's crops."""
    pair, device = [runs[n] for n in ("baseline", "residual")], scores.device
    out.figure("curves", "Figure 1: training curves of the baseline (the handout's Figure 3) and of the residual "
               "model, same seed and data order; dashed: bicubic upsampling on Set5",
               lambda path: plot_curves(pair, path, LOSS_PANELS, references=bicubic_reference(scores), rows=2))
    out.table("gap", lambda: (gap_table(*pair, scores), baseline_values(runs, scores)))
    panels = [*interpolations(), ("baseline", pair[0].load(device)), ("residual", pair[1].load(device)), ("HR", None)]
    out.figure("crops", "Figure 2: a crop of comic (Set14, test), LR made by bilinear downscaling; PSNR of each crop",
               lambda path: plot_crops("comic", [(label.split()[0], "bilinear", up) for label, up in panels], path,
                                       device))


def learning_rates(out, runs, scores):
    """Task 5: the sweep's curves, table and outputs."""
    sweep, baseline = sweep_runs(runs), runs["baseline"]
    out.figure("lr-sweep", "Figure 3: learning-rate sweep of the BasicSRModel, 5,000 steps, same seed; lr 1e-4 "
               "is the baseline's first 5,000 steps; dashed: bicubic upsampling",
               lambda path: plot_curves(sorted([*sweep, baseline], key=lambda r: -r.train_config["lr"]), path,
                                        [LOSS_PANELS[0], *LOSS_PANELS[2:]], max_step=5000,
                                        labels={"baseline": "lr_1e-4"}, references=bicubic_reference(scores)))
    out.table("sweep", lambda: (sweep_table(runs), sweep_values(runs)))
    panels = [(run.name, "bilinear", run.load(scores.device)) for run in sweep if run.checkpoint]
    out.figure("lr-crops", "Figure 4: the sweep's models at step 5,000 on the crop of Figure 2",
               lambda path: plot_crops("comic", panels + [("bicubic", "bilinear", upsampling("bicubic")[1]),
                                                          ("HR", "bilinear", None)], path, scores.device,
                                       thumbnail=False))


def downscaling(out, runs, scores):
    """Task 5: the models on LR inputs made otherwise than in training."""
    pair = [runs[n] for n in ("baseline", "residual")]
    out.table("downscaling", lambda: (downscaling_table(pair, scores), downscaling_values(pair, scores)))
    residual = pair[1].load(scores.device)
    panels = [("LR by nearest (enlarged)", "nearest", "lr"),
              *[(f"residual, LR by {d.replace('_', ' ')}", d, residual) for d in DOWNSCALING], ("HR", "bilinear", None)]
    out.figure("downscaling-crops", "Figure 5: the residual model on LR inputs made four ways (it was trained on "
               "bilinear); a crop of butterfly (Set5)",
               lambda path: plot_crops("butterfly", panels, path, scores.device, thumbnail=False))


def adversarial(out, runs, scores, cfg):
    """Task 6: the GAN run's curves, its trade-off against the checkpoint it started from, its texture."""
    gan, start = runs["gan"], fine_tune_start(runs["gan"], cfg, scores.device)
    out.figure("gan-curves", f"Figure 6: the GAN run (the residual model fine-tuned with L1 + "
               f"{gan.train_config['adv_weight']:g} × relativistic adversarial loss)",
               lambda path: plot_curves([gan], path, GAN_PANELS, rows=2))
    out.table("gan", lambda: (gan_table(gan, start, runs["residual"], scores),
                              gan_values(gan, start, runs["residual"], scores)))
    panels = [("bicubic", upsampling("bicubic")[1]), (f"{start[0]} (GAN's start)", start[1]),
              ("GAN", gan.load(scores.device)), ("HR", None)]
    out.figure("gan-crops", "Figure 7: the GAN against the model it started from, a crop of zebra (Set14, test)",
               lambda path: plot_crops("zebra", [(label, "bilinear", up) for label, up in panels], path, scores.device))


def final_model(out, runs, scores):
    """The final model: the standard protocol against published results, its curves, the ablation."""
    def standard():
        text, standard_scores = standard_table(runs, scores.device)
        final = runs.get("final")
        if not (final and final.checkpoint):
            return text, recipe_values()
        return text, {**recipe_values(), **final_values(runs, standard_scores),
                      **moving_average_values(final, standard_scores, scores.device)}

    out.table("standard", standard)
    out.table("ablation", lambda: ablation_table(runs, scores.device))
    if "final" in runs:
        ablation = [runs[n] for n in dict(ABLATION) if n in runs]
        groups = [([runs["final"]], runs["final"].planned)] + ([(ablation, ablation[0].planned)] if ablation else [])
        panels = [LOSS_PANELS[0], LOSS_PANELS[2], ("train/lr", "learning rate", False)]
        out.figure("final-curves", "Figure 8: top, the final model's training; bottom, the ablation runs of Table 7 "
                   "on their own step axis (validation: RGB, LR by MATLAB bicubic; with ema, the weights' moving "
                   "average; the learning rate is logged only where it is scheduled); dashed: bicubic upsampling",
                   lambda path: plot_curve_rows(groups, path, panels, bicubic_reference(scores, "bicubic_matlab")))
    if "final" in runs and runs["final"].checkpoint:
        final = runs["final"].load(scores.device)
        panels = [("bicubic (MATLAB imresize)", lambda lr: imresize_matlab(lr, SCALE))]
        panels += [(runs[n].label(), runs[n].load(scores.device)) for n in ("residual_matlab",) if n in runs and runs[n].checkpoint]
        panels += [(runs["final"].label(), final), ("final model, x8 self-ensemble", self_ensemble(final)), ("HR", None)]
        out.figure("final-crops", "Figure 9: the final model on a crop of barbara (Set14, test), LR by MATLAB bicubic "
                   "as in the standard protocol; PSNR of each crop (RGB)",
                   lambda path: plot_crops("barbara", [(label, "bicubic_matlab", up) for label, up in panels], path,
                                           scores.device))


def build(cfg, out_dir, device, only=None):
    """Write every table (.md) and figure (.png) of the report to `out_dir`; returns ({block: markdown},
    {value name: text}). `only` (a set of block names) limits the work, for tests."""
    runs, scores, out = available_runs(cfg), Scores(device), Output(out_dir, only)
    out.table("runs", lambda: runs_table(list(runs.values())))
    tested = [runs[n] for n in ("baseline", "residual", "gan") if n in runs and runs[n].checkpoint]
    out.table("key-results", lambda: key_table(tested, scores))
    if all(n in runs and runs[n].checkpoint for n in ("baseline", "residual")):
        baseline_and_residual(out, runs, scores)
        if sweep_runs(runs):
            learning_rates(out, runs, scores)
        downscaling(out, runs, scores)
        if "gan" in runs and runs["gan"].checkpoint:
            adversarial(out, runs, scores, cfg)
    final_model(out, runs, scores)
    return out.blocks, out.values


def fill(text, blocks, values):
    """The template with each `{{name}}` replaced by its block or value; an unknown name is an error."""
    content = {**values, **blocks}
    missing = sorted(set(PLACEHOLDER.findall(text)) - set(content))
    if missing:
        raise SystemExit(f"error: {TEMPLATE} quotes {{{{{missing[0]}}}}}, which the report did not compute")
    return PLACEHOLDER.sub(lambda match: content[match.group(1)].rstrip("\n"), text)


def fill_markers(text, blocks):
    """Replace the body of each `<!-- report:NAME -->` block whose NAME is in `blocks`."""
    def replace(match):
        name = match.group("name")
        return match.group(0) if name not in blocks else f"{match.group(1)}{blocks[name]}{match.group(4)}"
    return MARKER.sub(replace, text)


def render_pdf(markdown_path, pdf_path, root="."):
    """Markdown -> PDF with markdown-pdf (PyMuPDF); fixed metadata so a rerun gives the same file."""
    from markdown_pdf import MarkdownPdf, Section

    css = ("body {font-size: 9.5pt;} h1 {font-size: 16pt;} h2 {font-size: 12.5pt;} h3 {font-size: 10.5pt;} "
           "table {border-collapse: collapse; font-size: 8pt;} th, td {border: 1px solid #999; padding: 1px 3px;} "
           "img {width: 100%;} pre, code {font-size: 8pt;}")
    pdf = MarkdownPdf(toc_level=2, optimize=True)
    pdf.meta.update({"creationDate": "", "modDate": "", "title": "x2 single-image super-resolution"})
    with open(markdown_path) as f:
        for part in f.read().split(NEW_PAGE):  # each part starts on a new page
            pdf.add_section(Section(part, root=root), user_css=css)
    pdf.save(pdf_path)
    return pdf_path


def publish(out_dir, blocks, values):
    """The template filled into runs/report/report.md, rendered to README.pdf; README.md's key-results block."""
    with open(TEMPLATE) as f:
        filled = fill(f.read(), blocks, values)
    markdown = os.path.join(out_dir, "report.md")
    with open(markdown, "w") as f:
        f.write(filled)
    with open("README.md") as f:
        readme = f.read()
    with open("README.md", "w") as f:
        f.write(fill_markers(readme, {name: blocks[name] for name in ("key-results",) if name in blocks}))
    return render_pdf(markdown, "README.pdf")


def main(argv):
    out_dir = os.path.join("runs", "report")
    if argv == ["pdf"]:  # after editing code/report.md's prose: render again from the saved blocks and values
        saved = read_json(os.path.join(out_dir, "report.json"))
        if saved is None:
            raise SystemExit(f"error: {out_dir}/report.json: no such file; run `make report` first")
        print(publish(out_dir, saved["blocks"], saved["values"]))
        return
    cfg = config.from_argv(argv, ("report", "run", "system"))
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    device = system.pick_device(cfg["device"])
    for set_name in ("T91", *EVAL_SETS):
        if not os.path.isdir(os.path.join(DATA_ROOT, set_name)):
            raise SystemExit(f"error: {DATA_ROOT}/{set_name}: no such folder; the report evaluates on the standard sets")
    out_dir = cfg["report_dir"] or os.path.join(cfg["runs_dir"], "report")
    blocks, values = build(cfg, out_dir, device)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"blocks": blocks, "values": values}, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(blocks)} blocks and {len(values)} values to {out_dir}; {publish(out_dir, blocks, values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
