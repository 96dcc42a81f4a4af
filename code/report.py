"""The report: README.pdf (and README.md's key-results block), made from the committed checkpoints and logs.

    python code/report.py               # make report: evaluate, plot, fill the template, render README.pdf
    python code/report.py device=cuda   # the same on a GPU (the numbers can differ in the last digits)
    python code/report.py pdf           # make pdf: render again after editing code/report.md's prose
    python code/report.py report_blocks=standard,final-curves   # only these again, the others from report.json

Each run of code/experiments.py contributes its final checkpoints/<run>/model.pt, or while it is still
training its newest step*.pt (labelled "in progress"), and its TensorBoard scalars in runs/<run>/.
`build` computes every table, figure and number the prose quotes; code/report.md is the prose, with
`{{name}}` where they go, and each name is written out in full where its value is computed here (grep finds it).
Outputs in report_dir (runs/report): figures, tables, report.json with every block and value, report.md as
filled; README.md's `<!-- report:NAME -->` blocks; README.pdf. A rerun writes the same bytes.
"""
import collections
import functools
import json
import math
import os
import re
import statistics
import sys

import torch

import config
import pages
import plots
import system
from checkpoints import RAW_WEIGHTS, load_checkpoint, load_model, step_checkpoints
from dataset import SRDataset, crop_to_multiple, decode_image, imresize_matlab, save_first_pair, to_float
from experiments import ABLATION, FINAL_RECIPE, RUNS
from metrics import LOGGED_L1, evaluate, evaluate_standard, interpolate, standard_set
from models import Discriminator, count_parameters, self_ensemble

DATA_ROOT = config.DATA_ROOT  # the standard sets: `make data-standard` puts them there
EVAL_SETS = ("Set5", "Set14", "BSD68")  # the RGB protocol of Tasks 5 and 6: Set5 validates, Set14 and BSD68 test
STANDARD_SETS = ("Set5", "Set14", "B100")  # the standard protocol, on the sets the SR papers report
ENSEMBLE_SETS = ("Set5", "Set14")  # the x8 self-ensemble: on B100 it would take 8x its 100 images
DOWNSCALING = ("bilinear", "bicubic", "nearest", "nearest_centred")  # how the LR input is made at test time
# the final model (T91 + BSD200 and their downscaled copies), the one it was fine-tuned from (T91), and the same
# fine-tune without the downscaled copies
FINAL, FINAL_T91, FINAL_NO_RESCALE = "final", "final_t91", "final_no_rescale"
SCALE = 2  # the runs of experiments.RUNS, and the published results below, are x2
LAST = 5  # one averaging window everywhere: a run's level is the mean ± sd of its last 5 validations
TREND_FRACTION, TREND_DB = 0.2, 0.05  # the trend test: last 20% of the steps against the 20% before
# Published x2 results of the standard protocol (Y channel, MATLAB bicubic LR, 2 px shaved): name, parameters,
# training images, {set: (PSNR, SSIM)}. SRCNN 9-5-5 (Dong et al. 2016, TPAMI), FSRCNN (Dong et al. 2016, ECCV),
# VDSR (Kim et al. 2016, CVPR), DRRN B1U25 (Tai et al. 2017, CVPR); B100 values as in the VDSR and DRRN tables.
TARGETS = {"Set5": 37.30, "Set14": 32.95, "B100": 31.80}  # dB: the project's goals for the final single model
PUBLISHED = (("SRCNN", "57k", "ImageNet (395k)",
              {"Set5": (36.66, 0.9542), "Set14": (32.42, 0.9063), "B100": (31.36, 0.8879)}),
             ("FSRCNN", "12k", "T91 + General-100 (191)",
              {"Set5": (37.00, 0.9558), "Set14": (32.63, 0.9088), "B100": (31.53, 0.8920)}),
             ("VDSR", "665k", "T91 + BSD200 (291)",
              {"Set5": (37.53, 0.9587), "Set14": (33.03, 0.9124), "B100": (31.90, 0.8960)}),
             ("DRRN", "297k", "T91 + BSD200 (291)",
              {"Set5": (37.74, 0.9591), "Set14": (33.23, 0.9136), "B100": (32.05, 0.8973)}))
# Fixed crops of the figures: (set, image, top, left, side) in HR pixels. The comparison crops of Figure 1 are
# not fixed: comparison_crops() finds them.
CROPS = {"comic": ("Set14", "comic.png", 40, 60, 96), "zebra": ("Set14", "zebra.png", 70, 300, 64),
         "butterfly": ("Set5", "butterfly.png", 90, 100, 96), "barbara": ("Set14", "barbara.png", 180, 380, 64)}
COMPARISON_SIDE = 40  # HR pixels of each comparison crop
NAMES = {"baseline": "baseline", "residual": "residual", "gan": "GAN", FINAL: "final",
         FINAL_T91: "final, T91 only", FINAL_NO_RESCALE: "final, no downscaled copies",
         "residual_matlab": "residual_matlab"}
MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /report:(?P=name) -->)", re.S)
PLACEHOLDER = re.compile(r"\{\{([\w-]+)\}\}")
NEW_PAGE = "<!-- new page -->"  # in the template: the PDF starts a new page there
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.md")
plots.use_report_style()
PM = "\u00a0±\u00a0"  # "a ± b" kept on one line in the PDF's narrow table columns


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


def signed(value, digits=2):
    """'+0.13', '−0.05', and '0.00' for what rounds to zero (no '−0.00')."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def pm(values, digits=2):
    """'mean ± sd' of a list, '—' for none (e.g. a run that diverged before its first validation)."""
    if not values:
        return "—"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}{PM}{sd:.{digits}f}"


def signed_pm(value, error):
    """A difference with its standard error, e.g. "+0.13 ± 0.01"."""
    return f"{signed(value)}{PM}{error:.2f}"


def spread(values, digits=2):
    """'a–b' of a few numbers, or the one number when they agree to `digits`."""
    if not values:
        return "—"
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}–{high}"


def trend_text(steps, values):
    """'+0.04 ± 0.02 dB, flat' of `trend`, or '—' where the curve is too short for the test."""
    gain, se, verdict = trend(steps, values)
    return "—" if math.isnan(gain) else f"{signed_pm(gain, se)} dB, {verdict}"


def trend(steps, values, fraction=TREND_FRACTION, tolerance=TREND_DB):
    """(gain, se, verdict) of a validation curve: gain = mean over the last `fraction` of the steps minus the mean
    over the `fraction` before it, se its standard error (from the scatter within each window). "rising" when the
    gain is above `tolerance` and two se; "flat" when both it and two se are within ±`tolerance` (a test that can
    tell); otherwise "no detectable trend (noisy)". Under a schedule that anneals the learning rate to ~0 the end
    of any run is flat by construction: flat says the run has settled, not that longer training cannot help."""
    last = steps[-1]
    recent = [v for s, v in zip(steps, values) if s > last * (1 - fraction)]
    before = [v for s, v in zip(steps, values) if last * (1 - 2 * fraction) < s <= last * (1 - fraction)]
    if len(recent) < 2 or len(before) < 2:
        return math.nan, math.nan, "—"
    gain = statistics.fmean(recent) - statistics.fmean(before)
    se = math.sqrt(statistics.variance(recent) / len(recent) + statistics.variance(before) / len(before))
    if gain > tolerance and gain > 2 * se:
        return gain, se, "rising"
    if abs(gain) < tolerance and 2 * se < tolerance:
        return gain, se, "flat"
    return gain, se, "no detectable trend (noisy)"


class Run:
    """What the report needs of one experiment: its checkpoint, planned settings, and logs."""

    def __init__(self, name, settings, cfg):
        self.name = name
        self.planned_config = config.parse_overrides(settings)
        self.planned = self.planned_config["max_steps"]
        # the checkpoint a fine-tune started from, as experiments.RUNS names it now
        init = self.planned_config["init"]
        self.init = os.path.relpath(init, cfg["ckpt_dir"]) if init else ""
        self.run_dir = os.path.join(cfg["runs_dir"], name)
        ckpt_dir = os.path.join(cfg["ckpt_dir"], name)
        final = os.path.join(ckpt_dir, "model.pt")
        newest = step_checkpoints(ckpt_dir)
        self.checkpoint = final if os.path.isfile(final) else (newest[0] if newest else None)
        self.scalars = plots.read_scalars(self.run_dir) if os.path.isdir(self.run_dir) else {}
        self.summary = read_json(os.path.join(self.run_dir, "summary.json")) or {}
        self.train_config = read_json(os.path.join(self.run_dir, "config.json")) or {}
        self.config = {**self.planned_config, **self.train_config}  # as trained where it has run, else as planned
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
        steps, values = self.series(f"train/{LOGGED_L1}")
        return steps[-1] if values and not math.isfinite(values[-1]) else None

    def load(self, device):
        """The run's model on `device`, read once: several tables and figures use it."""
        if device not in self.models:
            self.models[device] = load_model(self.checkpoint, device)[0]
        return self.models[device]

    def status(self):
        """'' for a finished run, else what it is: diverged, or in progress."""
        if self.diverged_at() is not None:
            last = f"step {self.step}" if self.step is not None else "none"
            return f"diverged at step {self.diverged_at()}; last finite checkpoint: {last}"
        if self.step is None:  # started, logging, but not yet at its first checkpoint
            return "in progress: no checkpoint yet"
        return f"in progress: step {self.step:,} of {self.planned:,}" if self.step < self.planned else ""

    def label(self):
        name = NAMES.get(self.name, self.name)
        return f"{name} [{self.status()}]" if self.status() else name

    def curve(self, max_step=None, label=None):
        """(label, scalars up to `max_step`) as plots.draw_curves draws them."""
        return label or NAMES.get(self.name, self.name), {tag: self.series(tag, max_step) for tag in self.scalars}


def available_runs(cfg):
    """{name: Run} of the runs of experiments.RUNS that have logs or a checkpoint (a run that diverged
    before its first checkpoint has only logs: it appears in the plots and the runs table)."""
    runs = [Run(name, settings, cfg) for name, settings in RUNS]
    return {run.name: run for run in runs if run.checkpoint is not None or run.scalars}


class RgbScores:
    """metrics.evaluate of each (method, set, degradation), computed once per report: tables share many cells."""

    def __init__(self, device):
        self.device, self.results = device, {}

    @functools.lru_cache(maxsize=None)
    def dataset(self, set_name, degradation="bilinear"):
        return SRDataset(os.path.join(DATA_ROOT, set_name), scale=SCALE, degradation=degradation, train=False)

    def score(self, label, upscale, set_name, degradation="bilinear"):
        if (label, set_name, degradation) not in self.results:
            self.results[label, set_name, degradation] = evaluate(upscale, self.dataset(set_name, degradation),
                                                                  self.device)
        return self.results[label, set_name, degradation]


@functools.lru_cache(maxsize=None)
def standard_images(folder):
    """The HR images of a standard set, decoded once per report."""
    return standard_set(folder, SCALE)


class StandardScores:
    """Per-image metrics of the standard protocol of each (method, set), computed once: the tables average them,
    the paired differences between two models compare them image by image."""

    def __init__(self, device):
        self.device, self.results = device, {}

    def per_image(self, label, upscale, set_name):
        if (label, set_name) not in self.results:
            images = standard_images(os.path.join(DATA_ROOT, set_name))
            self.results[label, set_name] = [evaluate_standard(upscale, [image], SCALE, self.device)
                                             for image in images]
        return self.results[label, set_name]

    def mean(self, label, upscale, set_name):
        """The set's metrics: per-image values summed in order, as evaluate_standard does for a whole set."""
        per_image = self.per_image(label, upscale, set_name)
        return {key: sum(m[key] for m in per_image) / len(per_image) for key in ("psnr", "ssim")}


def paired(after, before):
    """Mean ± standard error over images of the per-image PSNR differences `after - before` (per-image metrics
    of the same images): the ± is the spread over the images of one training run each, not training noise."""
    mean, sd = mean_sd([a["psnr"] - b["psnr"] for a, b in zip(after, before)])
    return signed_pm(mean, sd / math.sqrt(len(after)))


def upsampling(mode):
    """(label, upscale) of plain interpolation: the baseline every model has to beat."""
    return f"{mode} upsampling", lambda lr: interpolate(lr, SCALE, mode)


def matlab_bicubic(lr):
    return imresize_matlab(lr, SCALE)


def table(header, align, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def cell(metrics, keys=("psnr", "ssim")):
    formats = {"psnr": "{:.2f}", "ssim": "{:.4f}", "sharpness": "{:.3f}", "gmsd": "{:.4f}"}
    return " / ".join(formats[k].format(metrics[k]) for k in keys)


def short_hardware(text):
    return (text.replace("Intel(R) Xeon(R) Processor", "Xeon").replace(", 2 threads", "").replace(" autocast", "")
            .replace("AMD EPYC Processor", "AMD EPYC"))


def validation_window(run, count=LAST):
    """'steps a–b' of a run's last `count` validations, for the labels of the levels averaged over them."""
    steps = run.series("val/psnr")[0][-count:]
    return f"steps {steps[0]:,}–{steps[-1]:,}" if steps else "no validation"


# ---- tables -------------------------------------------------------------------------------------------------

def training_data(cfg):
    """'T91 + BSD200 (291)': the training folders of a run (a config) and their number of images, and
    ' at 5 scales' where the run also trained on them downscaled by 4 factors (scale_augment)."""
    folders = cfg["data_dir"].split(",")
    count = sum(len([n for n in os.listdir(f) if not n.startswith(".")]) for f in folders if os.path.isdir(f))
    scales = f" at {len(config.scale_factors(cfg['scale_augment'])) + 1} scales" if cfg.get("scale_augment") else ""
    return f"{' + '.join(os.path.basename(os.path.normpath(f)) for f in folders)} ({count}){scales}"


def runs_table(runs):
    """Every run: its data and batch, steps, samples seen, wall time, hardware, validation level and trend."""
    rows = []
    for run in runs:
        cfg = run.config
        steps, psnrs = run.series("val/psnr")
        long_run = not run.init and run.planned > 5000  # a verdict for the long runs from scratch only
        gain, se, verdict = trend(steps, psnrs) if steps and long_run else (math.nan, math.nan, "—")
        elapsed = run.summary.get("wall_time_s", run.payload.get("elapsed"))
        hardware = run.summary.get("hardware") or run.payload.get("hardware", "—")
        data = training_data(cfg)
        step = "—" if run.step is None else f"{run.step:,}"
        samples = "—" if run.step is None else f"{run.step * cfg['batch_size'] / 1000:,.0f}k"
        trend_cell = "—" if math.isnan(gain) else f"{signed_pm(gain, se)}, {verdict}"  # the table's unit: dB
        rows.append([run.name + (f" [{run.status()}]" if run.status() else ""),
                     cfg["model"] + (f" from {run.init}" if run.init else ""), data,
                     f"{cfg['batch_size']}×{cfg['patch_size']}²", f"{cfg['lr']:g}", step, samples,
                     "—" if elapsed is None else f"{elapsed / 3600:.2f}\u00a0h",  # kept on one line in the PDF
                     short_hardware(hardware).replace(" ", "\u00a0"),
                     pm(psnrs[-LAST:]), trend_cell])
    return table(["run", "model", "data", "batch × crop", "lr", "steps", "samples seen", "wall time", "hardware",
                  "val PSNR, last 5 (dB)", "trend, last 20% (dB)"],
                 ["---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---", "---:", "---"], rows)


def key_results(runs, scores):
    """Table 1: the models against interpolation on every set, the handout's protocol (RGB, bilinear LR),
    each model at its final checkpoint."""
    rows = [[label] + [cell(scores.score(label, upscale, s)) for s in EVAL_SETS]
            for label, upscale in task5_methods(runs, scores.device)]
    return table(["method (final checkpoint)", "Set5 (validation)", "Set14 (test)", "BSD68 (test)"],
                 ["---", "---:", "---:", "---:"], rows)


def task5_methods(runs, device):
    """(label, upscale) of the interpolation baselines, then of the Task 5/6 models (bilinear LR)."""
    models = [(runs[n].label(), runs[n].load(device)) for n in ("baseline", "residual", "gan")
              if n in runs and runs[n].checkpoint]
    return [upsampling("bilinear"), upsampling("bicubic"), *models]


def gap_table(baseline, residual, scores):
    """Baseline vs residual: Set5 over the last validations, the test sets at the final checkpoints."""
    level = [baseline.last(), residual.last()]
    gap = [r - b for b, r in zip(*level)]
    rows = [[f"Set5 validation, mean ± sd of {validation_window(baseline)}", pm(level[0]), pm(level[1]), pm(gap)]]
    for set_name in EVAL_SETS[1:]:
        cells = [scores.score(run.label(), run.load(scores.device), set_name)["psnr"] for run in (baseline, residual)]
        rows.append([f"{set_name} test, final checkpoint", f"{cells[0]:.2f}", f"{cells[1]:.2f}",
                     signed(cells[1] - cells[0])])
    return table(["PSNR (dB)", "baseline", "residual", "residual − baseline"], ["---", "---:", "---:", "---:"], rows)


def sweep_runs(runs):
    return [runs[n] for n, _ in RUNS if n.startswith("lr_") and n in runs]


def train_loss_mean(run, first_step, last_step):
    """Mean of the logged training L1 between two steps, or None where it is not finite."""
    steps, values = run.series(f"train/{LOGGED_L1}", last_step)
    window = [v for s, v in zip(steps, values) if s > first_step]
    return statistics.fmean(window) if window and all(math.isfinite(v) for v in window) else None


def sweep_table(runs):
    """Each learning rate's validation PSNR over its last 5 validations and its training L1 over the last 500 steps."""
    rows = []
    for run in [*sweep_runs(runs), runs.get("baseline")]:
        if run is None:
            continue
        lr = run.train_config["lr"]
        psnrs = run.last(max_step=5000)
        loss = train_loss_mean(run, 4500, 5000)
        note = "the baseline's first 5,000 steps" if run.name == "baseline" else run.status()
        rows.append((lr, [f"{lr:g}", pm(psnrs), spread(psnrs), "not finite" if loss is None else f"{loss:.4f}",
                          note or "—"]))
    return table(["lr", "val PSNR, steps 3,000–5,000 (dB)", "range", "train L1, steps 4,501–5,000", "note"],
                 ["---:", "---:", "---:", "---:", "---"], [row for _, row in sorted(rows, reverse=True)])


def downscaling_table(runs, scores):
    """PSNR / SSIM with LR inputs made by other downscaling than the bilinear one of training."""
    rows = []
    for set_name in EVAL_SETS:
        for label, upscale in task5_methods(runs, scores.device):
            rows.append([set_name, label] + [cell(scores.score(label, upscale, set_name, d)) for d in DOWNSCALING])
    return table(["set", "method"] + [f"LR by {d.replace('_', ' ')}" for d in DOWNSCALING],
                 ["---", "---"] + ["---:"] * len(DOWNSCALING), rows)


def gan_table(gan, start, scores):
    """PSNR, SSIM, sharpness and GMSD of the GAN against the checkpoint it started from, on the test sets."""
    rows = []
    for label, upscale in [upsampling("bicubic"), (start.label, start.model), (gan.label(), gan.load(scores.device))]:
        rows.append([label] + [cell(scores.score(label, upscale, s), ("psnr", "ssim", "sharpness", "gmsd"))
                               for s in EVAL_SETS[1:]])
    return table(["method", "Set14 PSNR / SSIM / sharpness / GMSD", "BSD68 PSNR / SSIM / sharpness / GMSD"],
                 ["---", "---:", "---:"], rows)


def standard_rows(runs):
    """(run or None, kind) of the standard-protocol table: bicubic, then each model, the final one also as an
    x8 self-ensemble."""
    rows = [(None, "—")]
    for name in ("residual_matlab", FINAL_T91, FINAL_NO_RESCALE, FINAL):
        if name in runs and runs[name].checkpoint:
            rows.append((runs[name], "single model"))
    if FINAL in runs and runs[FINAL].checkpoint:
        rows.append((runs[FINAL], "x8 self-ensemble"))
    return rows


def standard_method(run, kind, device):
    """(label, upscale) of a row of standard_rows."""
    if run is None:
        return "bicubic (MATLAB imresize)", matlab_bicubic
    model = run.load(device)
    return (f"{run.label()}, x8", self_ensemble(model)) if kind == "x8 self-ensemble" else (run.label(), model)


def standard_table(runs, standard):
    """x2 in the SR papers' protocol (metrics.evaluate_standard) beside published results."""
    rows = []
    for run, kind in standard_rows(runs):
        label, upscale = standard_method(run, kind, standard.device)
        model = run.load(standard.device) if run else None
        data = training_data(run.config) if run else "—"
        cells = [cell(standard.mean(label, upscale, s)) if run is None or kind == "single model" or s in ENSEMBLE_SETS
                 else "not run" for s in STANDARD_SETS]
        rows.append([run.label() if run else label, kind, f"{count_parameters(model) / 1000:.0f}k" if model else "—",
                     data, *cells])
    for name, params, data, values in PUBLISHED:
        rows.append([f"{name} (published)", "single model", params, data,
                     *[f"{values[s][0]:.2f} / {values[s][1]:.4f}" for s in STANDARD_SETS]])
    return table(["method", "inference", "parameters", "training images", *STANDARD_SETS],
                 ["---", "---", "---:", "---", "---:", "---:", "---:"], rows)


def ablation_table(runs, standard):
    """The ablation runs at equal steps, each adding settings to the one before: the Set5 validation level and
    the standard protocol on the test sets, with each step's gain as a paired difference over the images."""
    present = [(name, settings, runs[name]) for name, settings in ABLATION if name in runs and runs[name].checkpoint]
    if not present:
        return "*The ablation runs (`python code/experiments.py ablate_handout ...`) have not been trained yet.*\n", {}
    test_sets, rows, before, first, added_before, gains = ("Set14", "B100"), [], None, None, [], {}
    for name, settings, run in present:
        scores = {s: standard.per_image(run.label(), run.load(standard.device), s) for s in test_sets}
        added = ", ".join(f"`{setting}`" for setting in settings if setting not in added_before) or "—"
        added_before = settings
        cells = []
        for s in test_sets:
            if before:
                gains[name, s] = paired(scores[s], before[s])
            cells += [f"{statistics.fmean(m['psnr'] for m in scores[s]):.2f}", gains.get((name, s), "—")]
        rows.append([run.label(), added, pm(run.last()), *cells])
        before, first = scores, first or scores
    values = {"ablation_steps": f"{present[0][2].planned:,}",
              "ablation_total_Set14": paired(before["Set14"], first["Set14"]) if len(present) > 1 else "—",
              "ablation_total_B100": paired(before["B100"], first["B100"]) if len(present) > 1 else "—"}
    return table(["run", "adds", "Set5 val (RGB), last 5", "Set14", "Δ Set14", "B100", "Δ B100"],
                 ["---", "---", "---:", "---:", "---:", "---:", "---:"], rows), values


# ---- image figures --------------------------------------------------------------------------------------------

def high_res(set_name, file_name):
    return crop_to_multiple(to_float(decode_image(os.path.join(DATA_ROOT, set_name, file_name))), SCALE)


def plot_crops(crop_name, panels, out_path, device, errors=False, columns=None):
    set_name, file_name, top, left, side = CROPS[crop_name]
    cells = plots.crop_cells(high_res(set_name, file_name), (top, left, side), panels, SCALE, device, errors)
    return plots.plot_image_grid(cells, out_path, columns=columns or len(panels))


@torch.inference_mode()
def comparison_crops(runs, standard, device):
    """[(set, file, top, left)]: in Set14 and in B100, the image where the final model gains most over MATLAB
    bicubic (standard protocol, per image), and in it the crop where its squared error falls most."""
    final = runs[FINAL]
    found = []
    for set_name in ("Set14", "B100"):
        single = standard.per_image(final.label(), final.load(device), set_name)
        bicubic = standard.per_image("bicubic (MATLAB imresize)", matlab_bicubic, set_name)
        gains = [f["psnr"] - b["psnr"] for f, b in zip(single, bicubic)]
        file_name = sorted(os.listdir(os.path.join(DATA_ROOT, set_name)))[gains.index(max(gains))]
        hr = high_res(set_name, file_name)
        final_out = plots.upscaled(final.load(device), hr, "bicubic_matlab", SCALE, device)
        bicubic_out = plots.upscaled(matlab_bicubic, hr, "bicubic_matlab", SCALE, device)
        gain_map = ((bicubic_out - hr) ** 2 - (final_out - hr) ** 2).mean(0)
        window = pages.focus_window(gain_map, COMPARISON_SIDE)
        found.append((set_name, file_name, window["y"], window["x"]))
    return found


def comparison_figure(runs, standard, out_path, device):
    """Figure 1: each model on the degradation it was trained on; bicubic upsampling of the MATLAB-bicubic LR (the
    standard protocol's baseline, the stronger of the two)."""
    panels = [("HR", "bicubic_matlab", None), ("bicubic", "bicubic_matlab", matlab_bicubic)]
    panels += [(NAMES[n], "bilinear", runs[n].load(device)) for n in ("baseline", "residual", "gan")]
    panels += [(NAMES[n], "bicubic_matlab", runs[n].load(device)) for n in (FINAL_T91, FINAL)]
    cells, where = [], []
    for set_name, file_name, top, left in comparison_crops(runs, standard, device):
        cells += plots.crop_cells(high_res(set_name, file_name), (top, left, COMPARISON_SIDE), panels, SCALE, device)
        where.append(f"{set_name}/{file_name} at ({left}, {top})")
    plots.plot_image_grid(cells, out_path, columns=len(panels), title_size=7)
    return {"comparison_crops": " and ".join(where)}


def loader_check(out_dir, seed=0):
    """Task 1's check: one shuffled DataLoader batch of T91 with the handout's settings (64x64 crops, colour jitter
    0.2, bilinear LR), its first pair saved as lr_image.png / hr_image.png, four pairs as a figure."""
    dataset = SRDataset(os.path.join(DATA_ROOT, "T91"), patch_size=64, scale=SCALE, jitter=0.2)
    torch.manual_seed(seed)
    lr_image, hr_image = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)))
    save_first_pair(lr_image, hr_image, out_dir)
    cells = [(f"HR {i + 1}, 64×64", plots.to_pixels(hr), "") for i, hr in enumerate(hr_image)]
    cells += [(f"LR {i + 1}, 32×32", plots.to_pixels(lr), "") for i, lr in enumerate(lr_image)]
    return cells, f"lr {tuple(lr_image.shape)}, hr {tuple(hr_image.shape)}"


# ---- the report, section by section --------------------------------------------------------------------------

def figure_block(path, caption):
    return f"![{caption}]({path})\n\n*{caption}*\n"


class Output:
    """The report as it is made: tables (.md) and figures (.png) written to `out_dir`, {block: markdown} and
    {value: text} for the prose. `only` (a set of block names) limits the work (report_blocks=, tests)."""

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
        """make(path) draws the figure; it may return {value: text} for the prose."""
        if self.want(name):
            path = os.path.join(self.out_dir, f"{name}.png")
            made = make(path)  # the path, or {value: text} of the numbers the prose quotes about the figure
            self.values.update(made if isinstance(made, dict) else {})
            self.blocks[name] = figure_block(os.path.relpath(path), caption)


def bicubic_reference(scores, degradation="bilinear"):
    """{tag: [(label, value)]}: bicubic upsampling on Set5, the dashed line of the validation PSNR panels."""
    label, upscale = upsampling("bicubic")
    return {"val/psnr": [("bicubic upsampling", scores.score(label, upscale, "Set5", degradation)["psnr"])]}


def largest_jump(run, after=5000):
    """(dB, step) of the largest change of the validation PSNR between two validations after step `after` (before it,
    the curve is still rising from its start)."""
    steps, values = run.series("val/psnr")
    jumps = [(abs(b - a), s) for a, b, s in zip(values, values[1:], steps[1:]) if s > after]
    return max(jumps) if jumps else (math.nan, None)


def baseline_and_residual(out, runs, scores):
    """Task 5: the baseline's curves (handout Figure 3), the residual model against it."""
    pair = [runs[n] for n in ("baseline", "residual")]
    out.figure("curves", "Figure 3: training curves of the baseline (the handout's Figure 3) and of the residual "
               "model, same seed and data order; train L1 as a moving mean over 500 steps; dashed: bicubic "
               "upsampling on Set5",
               lambda path: plots.plot_curves([run.curve() for run in pair], path, plots.PANELS,
                                              references=bicubic_reference(scores), rows=2))
    out.table("gap", lambda: gap_table(*pair, scores))
    if not out.want("gap"):  # the values the prose quotes beside Table 2
        return
    baseline, residual = pair
    gaps = [r - b for b, r in zip(baseline.last(), residual.last())]
    jump, jump_step = largest_jump(baseline)
    test_gaps = [scores.score(residual.label(), residual.load(scores.device), s)["psnr"]
                 - scores.score(baseline.label(), baseline.load(scores.device), s)["psnr"] for s in EVAL_SETS[1:]]
    out.values.update({
        "gap_Set5": pm(gaps), "gap_tests": spread(test_gaps), "baseline_jump": f"{jump:.2f}",
        "baseline_jump_step": "—" if jump_step is None else f"{jump_step:,}",  # None: a run of 5,000 steps or less
        "baseline_trend": trend_text(*baseline.series("val/psnr")),
        "residual_trend": trend_text(*residual.series("val/psnr")),
        "baseline_start_val": f"{baseline.series('val/psnr')[1][0]:.2f}",
        "residual_start_val": f"{residual.series('val/psnr')[1][0]:.2f}",
        "bilinear_Set5": f"{scores.score(*upsampling('bilinear'), 'Set5')['psnr']:.2f}",
        "parameters": f"{count_parameters(residual.load(scores.device)):,}"})


def learning_rates(out, runs, scores):
    """Task 5: the sweep's curves, table and outputs."""
    sweep, baseline = sweep_runs(runs), runs["baseline"]
    curves = [run.curve(5000, "lr_1e-4" if run.name == "baseline" else run.name)
              for run in sorted([*sweep, baseline], key=lambda r: -r.train_config["lr"])]
    out.figure("lr-sweep", "Figure 4: learning-rate sweep of the BasicSRModel, 5,000 steps, same seed; lr 1e-4 is "
               "the baseline's first 5,000 steps; train L1 as a moving mean over 500 steps, its axis cut at 0.3 "
               "(lr 1e-2 peaks far above); dashed: bicubic upsampling",
               lambda path: plots.plot_curves(curves, path, [plots.PANELS[0], *plots.PANELS[2:]],
                                              references=bicubic_reference(scores),
                                              y_limits={f"train/{LOGGED_L1}": (0.01, 0.3)}))
    out.table("sweep", lambda: sweep_table(runs))
    if out.want("sweep"):
        sweep_values(out, sweep, baseline, runs)
    panels = [(run.name.replace("_", " "), "bilinear", run.load(scores.device)) for run in sweep if run.checkpoint]
    panels += [("bicubic", "bilinear", upsampling("bicubic")[1]), ("HR", "bilinear", None)]
    out.figure("lr-crops", "Figure 5: the sweep's models at step 5,000 on a crop of comic (Set14), LR by bilinear "
               "downscaling; PSNR / SSIM of the crop (lr 1e-4: no step-5,000 checkpoint is kept)",
               lambda path: plot_crops("comic", panels, path, scores.device))


def sweep_values(out, sweep, baseline, runs):
    """The numbers the prose quotes beside Table 3."""
    means = {run.name: mean_sd(run.last(max_step=5000))[0] for run in [*sweep, baseline]}
    sds = {run.name: mean_sd(run.last(max_step=5000))[1] for run in [*sweep, baseline]}
    out.values.update({"lr_1e-4": pm(baseline.last(max_step=5000)), "lr_1e-4_sd": f"{sds['baseline']:.2f}"})
    if "lr_1e-3" in runs:
        out.values.update({"lr_1e-3_sd": f"{sds['lr_1e-3']:.2f}",
                           "lr_1e-3_range": spread(runs["lr_1e-3"].last(max_step=5000)),
                           "lr_gap": f"{means['baseline'] - means['lr_1e-3']:.2f}"})
    if "lr_1e-2" in runs:
        out.values["lr_1e-2"] = pm(runs["lr_1e-2"].last(max_step=5000))
        out.values["lr_1e-2_peak_loss"] = f"{max(runs['lr_1e-2'].series(f'train/{LOGGED_L1}')[1]):.0f}"
    if "lr_1e-6" in runs:
        out.values["lr_1e-6"] = pm(runs["lr_1e-6"].last(max_step=5000))
    if "lr_1e-5" in runs:
        out.values["lr_1e-5_range"] = spread(runs["lr_1e-5"].last(max_step=5000))


def downscaling(out, runs, scores):
    """Task 5: the models on LR inputs made otherwise than in training."""
    out.table("downscaling", lambda: downscaling_table(runs, scores))
    residual = runs["residual"]
    model = residual.load(scores.device)

    def loss(good, bad):  # the residual model's PSNR with LR by `good` minus with LR by `bad`, per set
        return spread([scores.score(residual.label(), model, s, good)["psnr"]
                       - scores.score(residual.label(), model, s, bad)["psnr"] for s in EVAL_SETS], 1)

    bicubic = upsampling("bicubic")
    out.values.update({} if not out.want("downscaling") else {  # the values the prose quotes beside Table 4
        "residual_loss_bicubic": loss("bilinear", "bicubic"),
        "residual_loss_shift": loss("nearest_centred", "nearest"),
        "residual_loss_blur": loss("bilinear", "nearest_centred"),
        "bicubic_gain_bicubic": spread([scores.score(*bicubic, s, "bicubic")["psnr"]
                                        - scores.score(*bicubic, s, "bilinear")["psnr"] for s in EVAL_SETS], 1),
        "bicubic_shift": spread([scores.score(*bicubic, s, "nearest_centred")["psnr"]
                                 - scores.score(*bicubic, s, "nearest")["psnr"] for s in EVAL_SETS], 1)})
    panels = [("LR by nearest, enlarged", "nearest", "lr"),
              *[(f"from {d.replace('_', ' ')} LR", d, model) for d in DOWNSCALING], ("HR", "bilinear", None)]
    out.figure("downscaling-crops", "Figure 6: the residual model's output from LR made four ways (it was trained on "
               "bilinear); a crop of butterfly (Set5); PSNR / SSIM of the crop",
               lambda path: plot_crops("butterfly", panels, path, scores.device, columns=3))


FineTuneStart = collections.namedtuple("FineTuneStart", "label model step")


def fine_tune_start(run, cfg, device):
    """The checkpoint a fine-tune started from (the residual run has trained on since)."""
    model, payload = load_model(os.path.join(cfg["ckpt_dir"], run.init), device)
    return FineTuneStart(f"residual, step {payload['step']:,} (GAN's start)", model, payload["step"])


def adversarial(out, runs, scores, cfg):
    """Task 6: the GAN run's curves, its trade-off against the checkpoint it started from, its texture."""
    gan, residual = runs["gan"], runs["residual"]
    start = fine_tune_start(gan, cfg, scores.device)
    start_level = {tag: mean_sd(residual.last(tag, max_step=start.step))[0] for tag in ("val/psnr", "val/sharpness")}
    references = {tag: [(f"start, mean of its last {LAST}", value)] for tag, value in start_level.items()}
    panels = [plots.GAN_PANELS[i] for i in (0, 1, 2, 4, 5, 6)]  # D(real), D(fake) of the committed run: see text
    out.figure("gan-curves", f"Figure 7: the GAN run (the residual model fine-tuned with L1 + "
               f"{gan.train_config['adv_weight']:g} × relativistic adversarial loss); dashed: the level of the "
               "checkpoint it started from; the training losses as moving means over 500 steps",
               lambda path: plots.plot_curves([gan.curve()], path, panels, rows=2, references=references))
    out.table("gan", lambda: gan_table(gan, start, scores))
    if out.want("gan"):
        gan_values(out, gan, start, residual, scores)
    panels = [("HR", "bilinear", None), ("bicubic", "bilinear", upsampling("bicubic")[1]),
              ("GAN's start", "bilinear", start.model), ("GAN", "bilinear", gan.load(scores.device))]
    out.figure("gan-crops", "Figure 8: the GAN against the model it started from, a crop of zebra (Set14, test), LR "
               f"by bilinear downscaling; PSNR / SSIM of the crop; below, each output's error, {plots.ERROR_GAIN}× brighter",
               lambda path: plot_crops("zebra", panels, path, scores.device, errors=True))


def gan_values(out, gan, start, residual, scores):
    """The numbers the prose quotes beside Table 5."""
    before = {s: scores.score(start.label, start.model, s) for s in EVAL_SETS[1:]}
    after = {s: scores.score(gan.label(), gan.load(scores.device), s) for s in EVAL_SETS[1:]}
    d_loss = gan.series("train/d_loss")[1]
    out.values.update({
        "gan_steps": f"{gan.step:,}", "gan_start_step": f"{start.step:,}",
        "adv_weight": f"{gan.train_config['adv_weight']:g}",
        "discriminator_parameters": f"{count_parameters(Discriminator()):,}",
        "gan_cost_Set14": f"{before['Set14']['psnr'] - after['Set14']['psnr']:.2f}",
        "gan_cost_BSD68": f"{before['BSD68']['psnr'] - after['BSD68']['psnr']:.2f}",
        "gan_sharp_Set14": f"{after['Set14']['sharpness']:.3f} against {before['Set14']['sharpness']:.3f}",
        "gan_gmsd_Set14": f"{after['Set14']['gmsd']:.4f} against {before['Set14']['gmsd']:.4f}",
        "gan_val": pm(gan.last()), "gan_start_val": pm(residual.last(max_step=start.step)),
        "gan_d_loss": spread(d_loss[len(d_loss) // 2:])})


def final_values(runs, standard):
    """The numbers the prose quotes about the final model, each a paired difference or a set's mean."""
    final, t91 = runs[FINAL], runs[FINAL_T91]
    device = standard.device

    def single(run, set_name):
        return standard.per_image(run.label(), run.load(device), set_name)

    def psnr(run, set_name):
        return standard.mean(run.label(), run.load(device), set_name)["psnr"]

    def mean(run, set_name):
        return f"{psnr(run, set_name):.2f}"

    def versus(name, set_name):
        published = dict((row[0], row[3]) for row in PUBLISHED)[name][set_name][0]
        return signed(float(mean(final, set_name)) - published)

    x8 = {s: standard.per_image(f"{final.label()}, x8", self_ensemble(final.load(device)), s) for s in ENSEMBLE_SETS}
    values = {
        "final_Set5": mean(final, "Set5"), "final_Set14": mean(final, "Set14"), "final_B100": mean(final, "B100"),
        "final_vs_t91_Set5": paired(single(final, "Set5"), single(t91, "Set5")),
        "final_vs_t91_Set14": paired(single(final, "Set14"), single(t91, "Set14")),
        "final_vs_t91_B100": paired(single(final, "B100"), single(t91, "B100")),
        "final_x8_gain_Set5": paired(x8["Set5"], single(final, "Set5")),
        "final_x8_gain_Set14": paired(x8["Set14"], single(final, "Set14")),
        "final_vs_fsrcnn_B100": versus("FSRCNN", "B100"), "final_vs_vdsr_Set5": versus("VDSR", "Set5"),
        "final_vs_vdsr_Set14": versus("VDSR", "Set14"), "final_vs_vdsr_B100": versus("VDSR", "B100"),
        "final_steps": f"{final.step:,}", "final_t91_steps": f"{t91.step:,}",
        "final_hours": f"{final.summary.get('wall_time_s', final.payload.get('elapsed', 0)) / 3600:.1f}",
        "final_t91_hours": f"{t91.summary.get('wall_time_s', t91.payload.get('elapsed', 0)) / 3600:.1f}",
        "final_hardware": short_hardware(final.summary.get("hardware", "not recorded")),
        "final_t91_hardware": short_hardware(t91.summary.get("hardware", "not recorded")),
        "final_val_start": f"{final.series('val/psnr')[1][0]:.2f}", "final_val_level": pm(final.last()),
        "final_t91_val_level": pm(t91.last()), "final_t91_window": validation_window(t91)}
    matlab = runs.get("residual_matlab")
    if matlab and matlab.checkpoint:
        values["t91_vs_matlab_Set14"] = paired(single(t91, "Set14"), single(matlab, "Set14"))
        values["t91_vs_matlab_B100"] = paired(single(t91, "B100"), single(matlab, "B100"))
    raw_path = os.path.join(os.path.dirname(t91.checkpoint), RAW_WEIGHTS)
    if os.path.isfile(raw_path):  # the moving average at the end of the T91 run: model.pt against model_raw.pt
        raw = load_model(raw_path, device)[0]
        values["t91_ema_gain_Set14"] = paired(single(t91, "Set14"), standard.per_image("T91 raw", raw, "Set14"))
    no_rescale = runs.get(FINAL_NO_RESCALE)
    if no_rescale and no_rescale.checkpoint:  # what the downscaled copies bought, and the stage without them
        values.update({f"final_vs_no_rescale_{s}": paired(single(final, s), single(no_rescale, s))
                       for s in STANDARD_SETS})
        values.update({f"no_rescale_vs_t91_{s}": paired(single(no_rescale, s), single(t91, s)) for s in STANDARD_SETS})
        values["no_rescale_val_level"] = pm(no_rescale.last())
    gaps = {s: psnr(final, s) - TARGETS[s] for s in STANDARD_SETS}
    values["final_vs_targets"] = "; ".join(f"{s} {'met' if gap >= 0 else 'missed'} by {abs(gap):.2f} dB"
                                           for s, gap in gaps.items())
    values.update({f"target_{s}": f"{TARGETS[s]:.2f}" for s in STANDARD_SETS})
    values["final_t91_trend"] = trend_text(*t91.series("val/psnr"))
    recipe = dict(setting.split("=") for setting in FINAL_RECIPE)  # its settings as the text quotes them
    values.update(recipe_lr=recipe["lr"], recipe_lr_min=recipe["lr_min"], recipe_warmup_steps=recipe["warmup_steps"],
                  recipe_ema=recipe["ema"])
    return values


def final_model(out, runs, scores, standard):
    """The final model: its curves, the standard protocol against published results, the failure case, the ablation."""
    out.table("standard", lambda: standard_table(runs, standard))
    if out.want("standard") and all(n in runs and runs[n].checkpoint for n in (FINAL, FINAL_T91)):
        out.values.update(final_values(runs, standard))
    out.table("ablation", lambda: ablation_table(runs, standard))
    fine_tunes = [run for run in runs.values() if run.init.startswith(f"{FINAL_T91}{os.sep}")]
    ablation = [runs[n] for n in dict(ABLATION) if n in runs]
    bicubic = bicubic_reference(scores, "bicubic_matlab")
    groups = [([runs[n].curve() for n in (FINAL_T91,) if n in runs],
               runs[FINAL_T91].planned if FINAL_T91 in runs else None, bicubic)]
    if fine_tunes:  # no bicubic line: far below these runs, it would flatten their rise to a line
        groups.append(([run.curve() for run in fine_tunes], max(run.planned for run in fine_tunes), None))
    if ablation:
        groups.append(([run.curve() for run in ablation], ablation[0].planned, bicubic))
    panels = [plots.PANELS[0], plots.PANELS[2], (("train/lr",), "learning rate", False)]
    if out.want("final-curves") and FINAL in runs:  # the final stage's data, as the text beside the figure says it
        factors = [f"{f:g}" for f in config.scale_factors(runs[FINAL].config["scale_augment"])] or ["no factor"]
        out.values["final_scale_factors"] = factors[0] if len(factors) == 1 else \
            f"{', '.join(factors[:-1])} and {factors[-1]}"
    out.figure("final-curves", "Figure 9: top, the T91 run from scratch; middle, the fine-tunes on T91 + BSD200 that "
               "start from it; bottom, the ablation runs of Table 7; each row on its own step axis (validation: RGB "
               "on Set5, LR by MATLAB bicubic, the weights' moving average; train L1 as a moving mean over 500 "
               "steps); dashed: bicubic upsampling (not in the middle row: far below its runs, it would flatten "
               "their rise; that row's PSNR axis spans tenths of a dB); learning rate: the scheduled runs only (the "
               "two fine-tunes share one schedule)",
               lambda path: plots.plot_curve_rows(groups, path, panels))
    if FINAL in runs and FINAL_T91 in runs:
        panels = [("HR", "bicubic_matlab", None), ("bicubic", "bicubic_matlab", matlab_bicubic),
                  (NAMES[FINAL_T91], "bicubic_matlab", runs[FINAL_T91].load(scores.device)),
                  (NAMES[FINAL], "bicubic_matlab", runs[FINAL].load(scores.device))]
        out.figure("final-crops", "Figure 10: a failure case: a crop of barbara (Set14), LR by MATLAB bicubic; the "
                   "scarf's stripes are finer than the LR image can hold; PSNR / SSIM of the crop (RGB); below, "
                   f"each output's error, {plots.ERROR_GAIN}× brighter",
                   lambda path: plot_crops("barbara", panels, path, scores.device, errors=True))
        out.figure("comparison", "Figure 1: two crops of test images where the final model gains most over "
                   "bicubic; each model gets LR made as in its training (baseline, residual, GAN: bilinear; final "
                   "models: MATLAB bicubic), bicubic upsampling the MATLAB-bicubic LR; PSNR / SSIM of the crop (RGB)",
                   lambda path: comparison_figure(runs, standard, path, scores.device))


COMPARE_SET, COMPARE_CROP = "Set14", 160  # the page: Set14's images cut to 160x160 around their first view (< 10 MB)


def comparison_page(runs, out_dir, device):
    """runs/report/compare/index.html: Set14 in the browser (compare.py), the models trained on MATLAB-bicubic
    LR beside HR, the LR input, bilinear and bicubic, with a slider between any two."""
    models = [(runs[n].label(), runs[n].load(device)) for n in ("residual_matlab", FINAL_T91, FINAL)
              if n in runs and runs[n].checkpoint]
    dataset = SRDataset(os.path.join(DATA_ROOT, COMPARE_SET), scale=SCALE, degradation="bicubic_matlab", train=False)
    title = f"x{SCALE} on {COMPARE_SET}, LR by MATLAB bicubic: the final models of README.pdf"
    return pages.write_page(os.path.join(out_dir, "compare"), title,
                            pages.method_images(dataset, models, device, crop=COMPARE_CROP))


def build(cfg, out_dir, device, only=None):
    """Write every table (.md) and figure (.png) of the report to `out_dir`; returns ({block: markdown},
    {value name: text}). `only` (a set of block names) limits the work (report_blocks=, tests)."""
    runs, scores, standard, out = available_runs(cfg), RgbScores(device), StandardScores(device), Output(out_dir, only)
    out.table("runs", lambda: runs_table(list(runs.values())))
    out.table("key-results", lambda: key_results(runs, scores))
    if out.want("loader"):
        cells, shapes = loader_check(out_dir)
        out.figure("loader", "Figure 2: Task 1's check, one shuffled DataLoader batch of T91 with the handout's "
                   f"settings ({shapes}): random 64×64 crops, colour jitter 0.2, LR by antialiased bilinear "
                   "downscaling (lr_image.png, hr_image.png: its first pair)",
                   lambda path: plots.plot_image_grid(cells, path, columns=4, cell_inches=1.2))
    if all(n in runs and runs[n].checkpoint for n in ("baseline", "residual")):
        baseline_and_residual(out, runs, scores)
        if sweep_runs(runs):
            learning_rates(out, runs, scores)
        downscaling(out, runs, scores)
        if "gan" in runs and runs["gan"].checkpoint:
            adversarial(out, runs, scores, cfg)
    final_model(out, runs, scores, standard)
    if out.want("compare") and FINAL in runs and runs[FINAL].checkpoint:
        out.values["compare_page"] = os.path.relpath(comparison_page(runs, out_dir, device))
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
           "table {border-collapse: collapse; font-size: 7.5pt;} th, td {border: 1px solid #999; padding: 1px 3px;} "
           "img {width: 100%;} pre, code {font-size: 8pt;}")
    pdf = MarkdownPdf(toc_level=2, optimize=True)
    pdf.meta.update({"creationDate": "", "modDate": "", "title": "x2 single-image super-resolution"})
    with open(markdown_path) as f:
        for part in f.read().split(NEW_PAGE):  # each part starts on a new page
            pdf.add_section(Section(part, root=root), user_css=css)
    pdf.save(pdf_path)
    return pdf_path


def publish(out_dir, blocks, values):
    """The template filled into <out_dir>/report.md, rendered to README.pdf; README.md's key-results block."""
    with open(TEMPLATE) as f:
        filled = fill(f.read(), blocks, values)
    markdown = os.path.join(out_dir, "report.md")
    with open(markdown, "w") as f:
        f.write(filled)
    with open("README.md") as f:
        readme = f.read()
    with open("README.md", "w") as f:
        f.write(fill_markers(readme, {name: blocks[name] for name in ("key-results", "standard") if name in blocks}))
    return render_pdf(markdown, "README.pdf")


def saved_report(out_dir):
    """{"blocks", "values"} of the last `make report`, which `make pdf` and report_blocks= start from."""
    saved = read_json(os.path.join(out_dir, "report.json"))
    if saved is None:
        raise SystemExit(f"error: {out_dir}/report.json: no such file; run `make report` first")
    return saved


def main(argv):
    rerender = "pdf" in argv  # after editing code/report.md's prose: render again from the saved blocks and values
    argv = [a for a in argv if a != "pdf"]
    cfg = config.from_argv(argv, ("report", "run", "system"))
    out_dir = cfg["report_dir"] or os.path.join(cfg["runs_dir"], "report")
    if rerender:
        saved = saved_report(out_dir)
        print(publish(out_dir, saved["blocks"], saved["values"]))
        return
    only, saved = set(cfg["report_blocks"].split(",")) - {""}, None
    if only:  # a part of the report again (e.g. after one run changed): the rest as the last full run made it
        saved = saved_report(out_dir)
        known = {*saved["blocks"], "compare"}  # compare: the comparison page
        if only - known:
            raise SystemExit(f"error: report_blocks={cfg['report_blocks']}: no block {sorted(only - known)[0]!r}; "
                             f"blocks: {', '.join(sorted(known))}")
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    device = system.pick_device(cfg["device"])
    for set_name in ("T91", *EVAL_SETS, *STANDARD_SETS):
        if not os.path.isdir(os.path.join(DATA_ROOT, set_name)):
            raise SystemExit(f"error: {DATA_ROOT}/{set_name}: no such folder; the report evaluates on the standard "
                             f"sets: make data-standard ARGS=sets={','.join(dict.fromkeys(('T91', *EVAL_SETS, *STANDARD_SETS)))} "
                             "(or SR_DATA_ROOT=<a copy of them>)")
    blocks, values = build(cfg, out_dir, device, only or None)
    if saved:
        blocks, values = {**saved["blocks"], **blocks}, {**saved["values"], **values}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"blocks": blocks, "values": values}, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(blocks)} blocks and {len(values)} values to {out_dir}; {publish(out_dir, blocks, values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
