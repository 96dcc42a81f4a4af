"""README.pdf from the committed checkpoints and logs (make report). code/report.typ holds every sentence and caption; this
script writes what it quotes into runs/report: values.json (`#v.name`), <name>.json per table (`#tab("name")`), <name>.png per
figure (`#pic("name")`), and Typst sets README.pdf. Scores are memoised there in scores.json by checkpoint hash, set contents,
metrics.py, protocol and degradation (delete it after changing degrade() or the models)."""
import functools
import hashlib
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import sys
import types
from collections import namedtuple

import typst

import config
import metrics
import pages
import plots
import system
from checkpoints import RAW_WEIGHTS, load_checkpoint, load_model, step_checkpoints
from dataset import SRDataset, check_batch, crop_to_multiple, decode_image, imresize_matlab, list_images, set_names, to_float
from experiments import ABLATION, FINAL_RECIPE, RUNS
from models import Discriminator, count_parameters, self_ensemble
from stats import ends, level_order, mean_sd, number, paired, pm, rate, signed, signed_pm, spread, trend, trend_text

DATA_ROOT = config.DATA_ROOT  # the standard sets: `make data-standard` puts them there
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report.typ")
SETS = ("Set5", "Set14", "B100")  # Set5 validates; Set14 and B100 test (B100: the set the SR papers report)
DOWNSCALING = {"bilinear": "bilinear (training)", "bicubic": "bicubic", "nearest": "nearest, top-left",
               "nearest_last": "nearest, bottom-right", "box": "2×2 mean"}  # LR made otherwise at test time
SCALE, LAST, SWEEP = 2, 5, 5000  # x2; a run's level: the mean ± sd of its last 5 validations; the sweep's steps
# Published x2 results, papers' protocol: bicubic and VDSR (Kim et al. 2016), SRCNN 9-5-5, FSRCNN, DRRN B1U25 (Tai et al.)
PUBLISHED = (("bicubic", "—", "—", {"Set5": (33.66, .9299), "Set14": (30.24, .8688), "B100": (29.56, .8431)}),
             ("SRCNN", "57k", "ImageNet (395k)", {"Set5": (36.66, .9542), "Set14": (32.42, .9063), "B100": (31.36, .8879)}),
             ("FSRCNN", "12k", "T91 + General-100 (191)", {"Set5": (37.00, .9558), "Set14": (32.63, .9088), "B100": (31.53, .8920)}),
             ("VDSR", "665k", "T91 + BSD200 (291)", {"Set5": (37.53, .9587), "Set14": (33.03, .9124), "B100": (31.90, .8960)}),
             ("DRRN", "297k", "T91 + BSD200 (291)", {"Set5": (37.74, .9591), "Set14": (33.23, .9136), "B100": (32.05, .8973)}))
# fixed crops of the figures: (set, image, top, left, side) in HR pixels
CROPS = {"comic": ("Set14", "comic.png", 20, 20, 128), "zebra": ("Set14", "zebra.png", 60, 260, 128),
         "butterfly": ("Set5", "butterfly.png", 64, 64, 128), "barbara": ("Set14", "barbara.png", 160, 360, 128)}
TYPICAL_SIDE, BEST_SIDE = 160, 96  # HR pixels of the typical-image crops and of the best-case ones
TEXTURED = ("Set14", "baboon.png")  # the whole image whose power spectra Task 6 compares
NAMES = {"gan": "GAN", "final_t91": "final, T91 only", "final_no_rescale": "final, no downscaled copies"}
Method = namedtuple("Method", "label key upscale")  # key: what its scores are memoised under
plots.use_report_style()


def cell(scores, keys=("psnr", "ssim")):
    return " / ".join({"psnr": "{:.2f}", "ssim": "{:.4f}", "sharpness": "{:.3f}", "gmsd": "{:.4f}"}[k].format(scores[k]) for k in keys)


# ---- the runs, their models and their scores ------------------------------------------------------------------

def read_json(path):
    return json.loads(pathlib.Path(path).read_text()) if os.path.isfile(path) else None


class Run:
    """One experiment of experiments.RUNS as the report sees it: its checkpoint (model.pt, or its newest step*.pt
    while it trains), its settings, and its TensorBoard scalars."""

    def __init__(self, name, settings, cfg):
        self.name, self.planned_config = name, config.parse_overrides(settings)
        self.planned, init = self.planned_config["max_steps"], self.planned_config["init"]
        self.init = os.path.relpath(init, cfg["ckpt_dir"]) if init else ""  # the checkpoint a fine-tune started from
        self.run_dir, self.ckpt_dir = os.path.join(cfg["runs_dir"], name), os.path.join(cfg["ckpt_dir"], name)
        final, newest = os.path.join(self.ckpt_dir, "model.pt"), step_checkpoints(self.ckpt_dir)
        self.checkpoint = final if os.path.isfile(final) else (newest[0] if newest else None)
        self.scalars = plots.read_scalars(self.run_dir) if os.path.isdir(self.run_dir) else {}
        self.summary = read_json(os.path.join(self.run_dir, "summary.json")) or {}
        self.config = {**self.planned_config, **(read_json(os.path.join(self.run_dir, "config.json")) or {})}
        self.payload = load_checkpoint(self.checkpoint) if self.checkpoint else {}
        self.step = self.payload.get("step")

    def series(self, tag, max_step=None):
        kept = [(s, v) for s, v in zip(*self.scalars.get(tag, ([], []))) if max_step is None or s <= max_step]
        return [s for s, _ in kept], [v for _, v in kept]

    def last(self, tag="val/psnr", max_step=None):
        """The last LAST logged values of `tag` up to `max_step`: what a run's level is averaged over."""
        return self.series(tag, max_step)[1][-LAST:]

    def status(self):
        """'' for a finished run, else what it is: diverged, or in progress."""
        steps, losses = self.series(f"train/{metrics.LOGGED_L1}")
        if losses and not math.isfinite(losses[-1]):
            return f"diverged at step {steps[-1]}; last finite checkpoint: {self.step or 'none'}"
        if self.step is None:
            return "in progress: no checkpoint yet"
        return f"in progress: step {self.step:,} of {self.planned:,}" if self.step < self.planned else ""

    def hardware(self):
        text = self.summary.get("hardware") or self.payload.get("hardware", "—")
        return re.sub(r"Intel\(R\) |\(R\)| Processor|, \d+ threads| autocast", "", text)  # 'Xeon, bf16'

    def label(self, text=None):  # `text` (default: the run's name in the report) + " [its status]" if unfinished
        return (text or NAMES.get(self.name, self.name)) + (f" [{self.status()}]" if self.status() else "")

    def curve(self, max_step=None, label=None):
        return label or NAMES.get(self.name, self.name), {tag: self.series(tag, max_step) for tag in self.scalars}


def checkpoint_method(path, label, device):
    return Method(label, hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16], load_model(path, device)[0])


BILINEAR, BICUBIC = (Method(f"{m} upsampling", m, lambda lr, m=m: metrics.interpolate(lr, SCALE, m)) for m in ("bilinear", "bicubic"))
MATLAB = Method("bicubic (MATLAB imresize)", "bicubic_matlab", lambda lr: imresize_matlab(lr, SCALE))


def set_files(set_name):
    """The image files of a set, in the order its per-image scores are (dataset.list_images)."""
    return [os.path.basename(path) for path in list_images(os.path.join(DATA_ROOT, set_name))]


@functools.lru_cache(maxsize=None)
def set_key(folder):
    """What the scores on an image set depend on: its files' names and contents (and metrics.py's code)."""
    digest = hashlib.sha256(pathlib.Path(metrics.__file__).read_bytes())
    for path in list_images(folder):
        digest.update(os.path.basename(path).encode() + pathlib.Path(path).read_bytes())
    return f"{os.path.basename(folder)}:{digest.hexdigest()[:12]}"


class Scores:
    """Every score of the report, memoised in `path` (JSON) by the method's key, the set, protocol and device."""

    def __init__(self, path, device):
        self.path, self.device, self.saved = path, device, read_json(path) or {}

    def memo(self, key, compute):
        key = f"{key} {self.device.type}"
        if key not in self.saved:
            self.saved[key] = compute()
            system.write_file(self.path, json.dumps(self.saved, sort_keys=True) + "\n")  # kept if a later one fails
        return self.saved[key]

    def rgb(self, method, set_name, degradation="bilinear"):
        """The handout's protocol: metrics.evaluate's means over the set (RGB in [0, 1], LR by `degradation`)."""
        dataset = lambda: SRDataset(os.path.join(DATA_ROOT, set_name), scale=SCALE, degradation=degradation, train=False)
        return self.memo(f"rgb {method.key} {set_key(os.path.join(DATA_ROOT, set_name))} {degradation}",
                         lambda: metrics.evaluate(method.upscale, dataset(), self.device))

    def standard(self, method, set_name):
        """The papers' protocol (Y, MATLAB bicubic LR, 8 bits, 2 px shaved), per image."""
        images = lambda: metrics.standard_set(os.path.join(DATA_ROOT, set_name), SCALE)
        return self.memo(f"standard {method.key} {set_key(os.path.join(DATA_ROOT, set_name))}", lambda: [
            metrics.evaluate_standard(method.upscale, [image], SCALE, self.device) for image in images()])

    def standard_mean(self, method, set_name, key="psnr"):
        """The set's metric: per-image values summed in order, as evaluate_standard does for a whole set."""
        per_image = self.standard(method, set_name)
        return sum(m[key] for m in per_image) / len(per_image)

    def gains(self, method, set_name):
        """Per image, the PSNR of `method` minus MATLAB bicubic's, papers' protocol."""
        return [a["psnr"] - b["psnr"] for a, b in zip(self.standard(method, set_name), self.standard(MATLAB, set_name))]


def training_data(cfg):
    """'T91 + BSD200 (291)', ' at 5 scales' with downscaled copies; counted in DATA_ROOT's sets of those names."""
    names = set_names(cfg["data_dir"])
    count = sum(len(list_images(os.path.join(DATA_ROOT, n))) for n in names if os.path.isdir(os.path.join(DATA_ROOT, n)))
    scales = f" at {len(config.scale_factors(cfg['scale_augment'])) + 1} scales" if cfg.get("scale_augment") else ""
    return f"{' + '.join(names)} ({count}){scales}"


# ---- tables, as report.typ's `tab` sets them: {"header": [...], "rows": [[...]]} --------------------------------

def table(header, rows):
    return {"header": header, "rows": [[str(c) for c in row] for row in rows]}


def markdown(tab):
    """A table as markdown, for README.md's blocks."""
    lines = ["| " + " | ".join(tab["header"]) + " |", "|---" + "|---:" * (len(tab["header"]) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in tab["rows"]]) + "\n"


def standard_table(rows, scores):
    """(method, training data, parameters) rows in the papers' protocol, beside the published results."""
    out = [[m.label, parameters, data, *[cell({k: scores.standard_mean(m, s, k) for k in ("psnr", "ssim")})
                                         if not m.key.endswith("x8") or s != "B100" else "not run" for s in SETS]]
           for m, data, parameters in rows]
    out += [[f"{name} (published)", params, data, *[f"{v[s][0]:.2f} / {v[s][1]:.4f}" for s in SETS]]
            for name, params, data, v in PUBLISHED]
    return table(["method", "parameters", "training images", *SETS], out)


def ablation_table(runs, method, scores):
    """Each ablation run adds settings to the one before: Set5 level, the test sets and the paired gains; and the
    values of all of them against the first."""
    rows, before, first, added_before = [], None, None, []
    for name, settings in ABLATION:
        now = {s: scores.standard(method[name], s) for s in SETS[1:]}
        cells = [x for s in SETS[1:] for x in (f"{scores.standard_mean(method[name], s):.2f}",
                                               paired(now[s], before[s]) if before else "—")]
        added = ", ".join(x for x in settings if x not in added_before) or "—"
        rows.append([runs[name].label(), added, pm(runs[name].last()), *cells])
        before, first, added_before = now, first or now, settings
    return (table(["run", "adds", "Set5 val (RGB), last 5", "Set14", "Δ Set14", "B100", "Δ B100"], rows),
            {f"ablation_total_{s}": paired(before[s], first[s]) for s in SETS[1:]})


def runs_table(runs):
    rows = []
    for run in runs:
        cfg, (steps, psnrs) = run.config, run.series("val/psnr")
        gain, se, verdict = trend(steps, psnrs) if steps and not run.init and run.planned > 5000 else (0, 0, "—")
        elapsed = run.summary.get("wall_time_s", run.payload.get("elapsed"))
        start = re.fullmatch(r"(.+)/model(?:_0*(\d+))?\.pt", run.init)  # 'residual/model_020000.pt': residual at step 20,000
        source = (f" from {start[1]}" + (f", step {int(start[2]):,}" if start[2] else "")) if start else ""
        rows.append([run.label(run.name), cfg["model"] + source, training_data(cfg),
                     f"{cfg['batch_size']}×{cfg['patch_size']}²", rate(cfg["lr"]),
                     *(["—", "—"] if run.step is None else [f"{run.step:,}", f"{run.step * cfg['batch_size'] / 1000:,.0f}k"]),
                     "—" if elapsed is None else f"{elapsed / 3600:.2f}\u00a0h", run.hardware(), pm(psnrs[-LAST:]),
                     "—" if verdict == "—" else f"{signed_pm(gain, se)}, {verdict}"])
    return table(["run", "model", "data", "batch × crop", "lr", "steps", "samples", "wall time", "hardware",
                  "Set5 level (dB)", "trend, last 20% (dB)"], rows)


# ---- image figures ------------------------------------------------------------------------------------------

def high_res(set_name, file_name):
    return crop_to_multiple(to_float(decode_image(os.path.join(DATA_ROOT, set_name, file_name))), SCALE)


def crops_figure(r, name, panels, columns, errors=False, where=None):
    """<name>.png: one crop, `where` = (set, image, top, left, side) or CROPS[name], by each panel (label, LR
    degradation, upscale; None = HR, "lr" = the LR input enlarged), drawn without smoothing with the crop's PSNR /
    SSIM; `errors`: a row of error maps."""
    set_name, file_name, *box = where or CROPS[name]
    cells = plots.crop_cells(high_res(set_name, file_name), box, panels, SCALE, r.device, errors)
    plots.plot_image_grid(cells, r.fig(name), columns=columns)


def best_case_figure(path, final, scores, device):
    """In Set14 and in B100 the image where the final model gains most over bicubic, and in it the window where its
    squared error falls most: chosen twice for the largest gain (a best case, labelled as one)."""
    cells = []
    for set_name in ("Set14", "B100"):
        gains = scores.gains(final, set_name)
        file_name = set_files(set_name)[gains.index(max(gains))]
        hr = high_res(set_name, file_name)
        ours, bicubic = (plots.upscaled(m.upscale, hr, "bicubic_matlab", SCALE, device) for m in (final, MATLAB))
        window = pages.focus_window(((bicubic - hr) ** 2 - (ours - hr) ** 2).mean(0), BEST_SIDE)
        panels = [(f"HR, {set_name}/{file_name}", None), ("bicubic", MATLAB.upscale), ("final", final.upscale), ("LR input", "lr")]
        cells += plots.crop_cells(hr, (window["y"], window["x"], BEST_SIDE),
                                  [(label, "bicubic_matlab", upscale) for label, upscale in panels], SCALE, device)
    plots.plot_image_grid(cells, path, columns=4)


def loader_figure(path, out_dir, seed=0):
    """Task 1's check (dataset.check_batch) on T91 with the handout's settings, its batch drawn; returns the shapes."""
    lr_image, hr_image = check_batch(SRDataset(os.path.join(DATA_ROOT, "T91"), patch_size=64, scale=SCALE, jitter=0.2), seed, out_dir)
    cells = [(f"{kind} {i + 1}", plots.to_pixels(x), "") for kind, batch in (("HR", hr_image), ("LR", lr_image))
             for i, x in enumerate(batch)]
    plots.plot_image_grid(cells, path, columns=8, cell_inches=0.8)
    return f"LR {tuple(lr_image.shape)}, HR {tuple(hr_image.shape)}"


# ---- the report, section by section: each writes its figures and tables and the values the text quotes -------

def headline(r):
    """Table 1, and the final model and the Task 5/6 models on a typical test image (the handout's Figure 1)."""
    methods = [BILINEAR, BICUBIC, *(r.method[n] for n in ("baseline", "residual", "gan"))]
    r.tables["key_results"] = table(["method", "Set5 (validation)", "Set14 (test)", "B100 (test)"],
                                    [[m.label] + [cell(r.scores.rgb(m, s)) for s in SETS] for m in methods])
    gains = r.scores.gains(r.method["final"], "B100")
    index = gains.index(statistics.median_low(gains))  # the median gain (low median: one of the images)
    typical = set_files("B100")[index]
    hr = high_res("B100", typical)
    top, left = pages.detail_window(hr, TYPICAL_SIDE)
    r.v.update(typical=typical, typical_gain=f"{gains[index]:.2f}", typical_box=f"({left}, {top})",
               typical_side=str(TYPICAL_SIDE), best_side=str(BEST_SIDE), parameters=f"{count_parameters(r.method['residual'].upscale):,}")
    panels = [("HR", "bicubic_matlab", None), ("final", "bicubic_matlab", r.method["final"].upscale),
              ("bicubic", "bicubic_matlab", MATLAB.upscale)]
    where = ("B100", typical, top, left, TYPICAL_SIDE)
    crops_figure(r, "typical", panels, 3, errors=True, where=where)  # the LR input under HR
    outputs = [plots.upscaled(m.upscale, hr, "bicubic_matlab", SCALE, r.device) for m in (MATLAB, r.method["final"])]
    plots.plot_split(*outputs, r.fig("split"), (f"← {MATLAB.label}", "final →"), window=(top, left, TYPICAL_SIDE))
    panels = [("HR", None), ("bicubic", BICUBIC.upscale)] + [(NAMES.get(n, n), r.method[n].upscale) for n in ("baseline", "residual", "gan")]
    crops_figure(r, "typical_task5", [(label, "bilinear", upscale) for label, upscale in panels], 5, errors=True, where=where)
    r.v["loader_shapes"] = loader_figure(r.fig("loader"), r.out)


def baseline_and_residual(r):
    """Task 5: the baseline's curves (the handout's Figure 3), the residual model against it."""
    baseline, residual = r.runs["baseline"], r.runs["residual"]
    plots.plot_curves([baseline.curve(), residual.curve()], r.fig("curves"), plots.PANELS, references=r.reference)
    levels = [baseline.last(), residual.last()]
    tested = [[r.scores.rgb(r.method[n], s)["psnr"] for s in SETS] for n in ("baseline", "residual")]
    steps = baseline.series("val/psnr")[0][-LAST:]
    rows = [[f"Set5, level: mean ± sd of steps {steps[0]:,}–{steps[-1]:,}", *map(pm, levels),
             signed_pm(*mean_sd([b - a for a, b in zip(*levels)]))]]
    rows += [[f"{s}, last step's weights", f"{a:.2f}", f"{b:.2f}", signed(b - a)] for s, a, b in zip(SETS, *tested)]
    r.tables["gap"] = table(["PSNR (dB)", "baseline", "residual", "residual − baseline"], rows)
    r.v.update(baseline_vs_level=signed(tested[0][0] - mean_sd(levels[0])[0]),
               residual_vs_level=signed(tested[1][0] - mean_sd(levels[1])[0]),
               gap_level=rows[0][-1], gap_tests=spread([b - a for a, b in zip(tested[0][1:], tested[1][1:])]),
               baseline_trend=trend_text(*baseline.series("val/psnr")), residual_trend=trend_text(*residual.series("val/psnr")),
               baseline_start_val=f"{baseline.series('val/psnr')[1][0]:.2f}", residual_start_val=f"{residual.series('val/psnr')[1][0]:.2f}",
               bilinear_Set5=f"{r.scores.rgb(BILINEAR, 'Set5')['psnr']:.2f}")


def learning_rates(r):
    """Task 5: the sweep to step 5,000, the rates continued to 30,000 against the baseline, the outputs at step 5,000."""
    baseline, rerun, psnr, l1 = r.runs["baseline"], r.runs["lr_1e-4"], "val/psnr", f"train/{metrics.LOGGED_L1}"
    sweep = sorted([x for n, x in r.runs.items() if n.startswith("lr_") and n != rerun.name] + [baseline], key=lambda x: -x.config["lr"])
    rate_label, last = lambda run: f"lr {rate(run.config['lr'])}", {run.name: run.last(max_step=SWEEP) for run in sweep + [rerun]}
    panels = [plots.PANELS[0], plots.PANELS[2], (("val/psnr_all",), "validation PSNR, all steps (dB)", False)]  # uncut, unlike SWEEP's
    plots.plot_curves([(rate_label(run), {**run.curve(SWEEP)[1], "val/psnr_all": run.series(psnr)}) for run in sweep], r.fig("lr_sweep"),
                      panels, references={**r.reference, "val/psnr_all": r.reference[psnr]},
                      y_limits={l1: (0.01, 0.3), "val/psnr_all": (26, 34.5)}, legend=(2, "lower right", 1))
    rows, at = [], dict(zip(*baseline.series(psnr)))  # the baseline's validations by step
    for run in sweep:  # L1: the mean of steps 4,501-5,000; a run trained on: its last 5 validations
        loss, steps, values, longer = ends(*run.series(l1, SWEEP))[1], run.series(psnr)[0][-LAST:], run.last(), run.planned > SWEEP
        shared = [(v, at[s]) for s, v in zip(*run.series(psnr)) if s in at][-LAST:]  # its last 5 validations with the baseline's
        versus = signed_pm(*mean_sd([a - b for a, b in shared])) if longer and shared and run is not baseline else "—"
        rows.append([rate(run.config["lr"]), pm(last[run.name]), spread(last[run.name]),
                     f"{loss:.4f}" if math.isfinite(loss) else "not finite",
                     f"{pm(values)} ({steps[0]:,}–{steps[-1]:,})" if longer and steps else "—", versus,
                     "the baseline" if run is baseline else run.status() or "—"])
        if longer and run is not baseline:
            r.v[f"{run.name.replace('-', '_')}_vs_baseline"] = versus
    r.tables["sweep"] = table(["lr", f"val PSNR to step {SWEEP:,} (dB)", "range", f"train L1 at {SWEEP:,}",
                               "val PSNR, last 5 (steps)", "Δ vs 1e-4 (dB)", "note"], rows)
    r.v.update({f"{('baseline_5k' if name == 'baseline' else name).replace('-', '_')}_level": pm(v) for name, v in last.items()},
               lr_ranking=", ".join(rate(run.config["lr"]) for run in sorted(sweep, key=lambda run: level_order(last[run.name]))),
               lr_1e_2_peak_loss=f"{max(r.runs['lr_1e-2'].series(l1)[1]):.0f}")
    shown = [rerun if run is baseline else run for run in sweep]  # the baseline kept only its last weights
    kept = lambda x: os.path.join(x.ckpt_dir, f"model_{SWEEP:06d}.pt")  # a run's weights at step SWEEP, where it kept them
    paths = [(rate_label(x), kept(x)) if os.path.isfile(kept(x)) else (x.label(rate_label(x)), x.checkpoint) for x in shown]
    panels = [(label, "bilinear", checkpoint_method(path, "", r.device).upscale) for label, path in paths if path]
    crops_figure(r, "comic", panels + [("bicubic", "bilinear", BICUBIC.upscale), ("LR input, pixels enlarged", "bilinear", "lr"),
                                       ("HR", "bilinear", None)], columns=4)


def downscaling(r):
    """Task 5: the residual model on LR made otherwise than in its training."""
    residual, models = r.method["residual"], {n: r.method[n] for n in ("baseline", "residual")}
    r.tables["downscaling"] = table(["set", "method", *DOWNSCALING.values()],
                                    [[s, m.label, *[cell(r.scores.rgb(m, s, d)) for d in DOWNSCALING]]
                                     for s in SETS for m in (BICUBIC, *models.values())])
    psnr = lambda method, s, d: r.scores.rgb(method, s, d)["psnr"]
    change = lambda m, a, b: spread([psnr(m, s, a) - psnr(m, s, b) for s in SETS], 1)
    r.v.update(bicubic_gain_bicubic=change(BICUBIC, "bicubic", "bilinear"), **{f"{n}_loss_{d}": change(m, "bilinear", d)
                                                                               for n, m in models.items() for d in list(DOWNSCALING)[1:]},
               **{f"residual_{d}_vs_bicubic": spread([psnr(residual, s, d) - psnr(BICUBIC, s, d) for s in SETS], 1)
                  for d in ("bicubic", "box", "nearest")})
    crops_figure(r, "butterfly", [(f"from {name} LR", d, residual.upscale) for d, name in DOWNSCALING.items()]
                 + [("HR", "bilinear", None)], columns=3)


def adversarial(r):
    """Task 6: the GAN's curves, its trade-off against the checkpoint it started from, its texture."""
    gan, residual = r.runs["gan"], r.runs["residual"]
    start_path = os.path.join(r.cfg["ckpt_dir"], gan.init)
    start_step = load_checkpoint(start_path)["step"]
    start = checkpoint_method(start_path, f"residual, step {start_step:,} (GAN's start)", r.device)
    start_level = {t: mean_sd(residual.last(t, max_step=start_step))[0] for t in ("val/psnr", "val/ssim", "val/sharpness")}
    plots.plot_curves([gan.curve()], r.fig("gan_curves"), [p for p in plots.GAN_PANELS if "train/d_real" not in p[0]], rows=2,
                      references={**start_level, "train/d_loss": math.log(2)})  # ln 2: D cannot tell
    methods, keys = [BICUBIC, start, r.method["gan"]], ("psnr", "ssim", "sharpness", "gmsd")
    r.tables["gan"] = table(["method", "Set14 PSNR / SSIM / sharpness / GMSD", "B100 PSNR / SSIM / sharpness / GMSD"],
                            [[m.label] + [cell(r.scores.rgb(m, s), keys) for s in SETS[1:]] for m in methods])
    before, after = ({s: r.scores.rgb(m, s) for s in SETS[1:]} for m in methods[1:])
    loss_ends = lambda tag, digits=3: " to ".join(f"{mean:.{digits}f}" for mean in ends(*gan.series(tag)))  # 500 steps each
    r.v.update(gan_steps=f"{gan.step:,}", gan_start_step=f"{start_step:,}", adv_weight=f"{gan.config['adv_weight']:g}",
               discriminator_parameters=f"{count_parameters(Discriminator()):,}", gan_val=pm(gan.last()),
               gan_start_val=pm(residual.last(max_step=start_step)), gan_d_loss_ends=loss_ends("train/d_loss"),
               gan_l1_ends=loss_ends(f"train/{metrics.LOGGED_L1}", 4), gan_adv_ends=loss_ends("train/adv"),
               gan_vs_level=signed(r.scores.rgb(r.method["gan"], "Set5")["psnr"] - mean_sd(gan.last())[0]),
               **{f"gan_cost_{s}": number(before[s]['psnr'] - after[s]['psnr']) for s in SETS[1:]},
               gan_sharp_Set14=f"{after['Set14']['sharpness']:.3f} against {before['Set14']['sharpness']:.3f}",
               gan_gmsd_Set14=f"{after['Set14']['gmsd']:.4f} against {before['Set14']['gmsd']:.4f}")
    panels = [("HR", None), ("bicubic", BICUBIC.upscale), ("GAN's start", start.upscale), ("GAN", methods[2].upscale)]
    crops_figure(r, "zebra", [(label, "bilinear", upscale) for label, upscale in panels], 4, errors=True)
    hf = plots.plot_spectra(high_res(*TEXTURED), [(n, "bilinear", m) for n, m in panels[1:]], SCALE, r.device, r.fig("spectra"))
    r.v.update({f"hf_gap_{name}": number(gap, 1) for name, gap in zip(("bicubic", "start", "gan"), hf)})


def final_model(r):
    """The final model in the papers' protocol, what its data bought, its curves, best and failure cases, ablation."""
    method, runs, per = r.method, r.runs, r.scores.standard
    rows = [(MATLAB, "—", "—")] + [(method[n], training_data(runs[n].config), f"{count_parameters(method[n].upscale) / 1000:.0f}k")
                                   for n in ("residual_matlab", "final_t91", "final_no_rescale", "final")]
    final, t91, no_rescale = method["final"], method["final_t91"], method["final_no_rescale"]
    x8 = Method(f"{final.label}, x8", f"{final.key} x8", self_ensemble(final.upscale))
    r.tables["standard"] = standard_table(rows + [(x8, *rows[-1][1:])], r.scores)
    published = {name: values for name, _, _, values in PUBLISHED}
    for s in SETS:
        mean = r.scores.standard_mean(final, s)
        r.v.update({f"final_vs_{name.lower()}_{s}": signed(mean - published[name][s][0]) for name in ("FSRCNN", "VDSR")})
        r.v.update({f"final_{s}": f"{mean:.2f}", f"final_vs_t91_{s}": paired(per(final, s), per(t91, s)),
                    f"final_vs_no_rescale_{s}": paired(per(final, s), per(no_rescale, s))})
    r.v.update({f"final_x8_gain_{s}": paired(per(x8, s), per(final, s)) for s in SETS[:2]},  # B100: 8 x 100 images
               **{f"t91_vs_matlab_{s}": paired(per(t91, s), per(method["residual_matlab"], s)) for s in SETS[1:]})
    raw = checkpoint_method(os.path.join(os.path.dirname(runs["final_t91"].checkpoint), RAW_WEIGHTS), "raw", r.device)
    r.v["t91_ema_gain_Set14"] = paired(per(t91, "Set14"), per(raw, "Set14"))
    run, t91_run = runs["final"], runs["final_t91"]
    factors = [f"{f:g}" for f in config.scale_factors(run.config["scale_augment"])]
    r.v.update({f"recipe_{k}": v for k, v in (x.split("=") for x in FINAL_RECIPE) if k in ("lr", "lr_min", "warmup_steps", "ema")})
    r.v.update(final_steps=f"{run.step:,}", final_t91_steps=f"{t91_run.step:,}", final_val_level=pm(run.last()),
               final_val_start=f"{run.series('val/psnr')[1][0]:.2f}", final_t91_val_level=pm(t91_run.last()),
               final_t91_trend=trend_text(*t91_run.series("val/psnr")),
               no_rescale_val_level=pm(runs["final_no_rescale"].last()), matlab_steps=f"{runs['residual_matlab'].step:,}",
               **{f"final_{k}": f"{run.config[k]:g}" for k in ("warmup_steps", "loss_border", "batch_size", "patch_size")},
               final_lr=rate(run.config["lr"]),
               final_scale_factors=f"{', '.join(factors[:-1])} and {factors[-1]}")
    r.tables["ablation"], values = ablation_table(runs, method, r.scores)
    r.v.update(values, ablation_steps=f"{runs[ABLATION[0][0]].planned:,}")
    reference = {"val/psnr": r.scores.rgb(BICUBIC, "Set5", "bicubic_matlab")["psnr"]}
    ablation = [runs[n] for n, _ in ABLATION]
    plots.plot_curve_rows([([t91_run.curve()], t91_run.planned, reference),
                           ([runs[n].curve(label=n) for n in ("final_no_rescale", "final")], run.planned, None),
                           ([x.curve() for x in ablation], ablation[0].planned, reference)], r.fig("final_curves"),
                          [((f"train/{metrics.LOGGED_L1}",), "train L1", False), plots.PANELS[2], (("train/lr",), "learning rate", False)])
    best_case_figure(r.fig("best_case"), final, r.scores, r.device)
    panels = [("HR", None), ("bicubic", MATLAB.upscale), ("final, T91 only", t91.upscale), ("final", final.upscale)]
    crops_figure(r, "barbara", [(label, "bicubic_matlab", upscale) for label, upscale in panels], 4, errors=True)


def context(cfg, out, device):
    """What every section reads and writes: the runs, their models, the scores, the tables and values made so far."""
    runs = {run.name: run for run in (Run(n, settings, cfg) for n, settings in RUNS) if run.checkpoint or run.scalars}
    missing = [n for n, _ in RUNS  # the other rates' logs suffice; lr_1e-4: its weights
               if n not in runs or not (runs[n].checkpoint or (n.startswith("lr_") and n != "lr_1e-4"))]
    if missing:
        raise SystemExit(f"error: the report needs run {missing[0]!r}, which has no checkpoint in {cfg['ckpt_dir']}: "
                         f"python code/experiments.py {missing[0]}")
    scores = Scores(os.path.join(out, "scores.json"), device)
    return types.SimpleNamespace(runs=runs, scores=scores, device=device, cfg=cfg, out=out, tables={}, v={},
        fig=lambda name: os.path.join(out, f"{name}.png"),
        method={n: checkpoint_method(run.checkpoint, run.label(), device) for n, run in runs.items() if run.checkpoint},
        reference={"val/psnr": scores.rgb(BICUBIC, "Set5")["psnr"]})  # bicubic upsampling's level


def build(cfg, out, device):
    """Every table, figure and value of report.typ into the folder `out`; returns (tables, values)."""
    r = context(cfg, out, device)
    for section in (headline, baseline_and_residual, learning_rates, downscaling, adversarial, final_model):
        section(r)
    r.tables["runs"] = runs_table(list(r.runs.values()))
    return r.tables, r.v


# ---- output -------------------------------------------------------------------------------------------------

MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /report:(?P=name) -->)", re.S)


def fill_markers(text, blocks):
    """Replace the body of each `<!-- report:NAME -->` block whose NAME is in `blocks`."""
    return MARKER.sub(lambda m: m.group(0) if m.group("name") not in blocks
                      else f"{m.group(1)}{blocks[m.group('name')]}{m.group(4)}", text)


def render_pdf(out, pdf_path):
    """report.typ set by Typst in `out`, beside its tables, figures and values.json: the same bytes on rerun (no
    date in the PDF, only the fonts that come with Typst)."""
    shutil.copyfile(TEMPLATE, os.path.join(out, "report.typ"))
    try:
        pdf = typst.compile(os.path.join(out, "report.typ"), root=out, ignore_system_fonts=True)
    except RuntimeError as err:  # typst.TypstError: e.g. a value the text quotes that build() did not write
        raise SystemExit(f"error: {TEMPLATE}: {str(err).splitlines()[0]}") from None
    system.write_file(pdf_path, pdf)
    return pdf_path


def publish(out, tables, values, pdf_path="README.pdf", readme="README.md"):
    """The tables and values.json into `out`, README.md's key-results and standard blocks, README.pdf."""
    for name, content in [*tables.items(), ("values", values)]:
        system.write_file(os.path.join(out, f"{name}.json"), json.dumps(content, indent=1, ensure_ascii=False) + "\n")
    blocks = {"key-results": markdown(tables["key_results"]), "standard": markdown(tables["standard"])}
    system.write_file(readme, fill_markers(pathlib.Path(readme).read_text(), blocks))
    return render_pdf(out, pdf_path)


def main(argv):
    cfg = config.from_argv(argv, ("report", "runs_dir", "ckpt_dir", "system"))
    out = cfg["report_dir"] or os.path.join(cfg["runs_dir"], "report")
    for set_name in ("T91", *SETS):
        if not os.path.isdir(os.path.join(DATA_ROOT, set_name)):
            raise SystemExit(f"error: {DATA_ROOT}/{set_name}: no such folder; the report evaluates on the standard "
                             "sets: make data-standard (or SR_DATA_ROOT=<a copy of them>)")
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    os.makedirs(out, exist_ok=True)
    tables, values = build(cfg, out, system.pick_device(cfg["device"]))
    print(f"wrote {len(tables)} tables, {len(values)} values and the figures to {out}; {publish(out, tables, values)}")


if __name__ == "__main__":
    main(sys.argv[1:])
