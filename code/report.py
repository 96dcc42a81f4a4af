"""The report: every table and figure of README.md / README.pdf, made from the committed checkpoints and logs.

    python code/report.py               # make report: evaluate, plot, fill README.md, render README.pdf
    python code/report.py device=cuda   # the same on a GPU (the numbers can differ in the last digits)
    python code/report.py pdf           # make pdf: only render README.md (after editing its prose)

Each run of code/experiments.py contributes its final checkpoints/<run>/model.pt, or while it is still
training its newest step*.pt (labelled "in progress"), and its TensorBoard scalars in runs/<run>/.
Outputs go to runs/report/ (tables as .md, figures as .png); README.md's blocks between
`<!-- report:NAME -->` and `<!-- /report:NAME -->` are replaced by them, then README.md is rendered
to README.pdf. Nothing in those blocks is typed by hand, and a rerun writes the same bytes.
"""
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import config
import system
from checkpoints import load_checkpoint, load_model, step_checkpoints
from dataset import SRDataset, crop_to_multiple, decode_image, degrade, imresize_matlab, to_float
from experiments import DATA_ROOT, RUNS
from metrics import LOSS_NAME, evaluate, evaluate_standard, interpolate, markdown_table, standard_set
from models import self_ensemble
from plots import plot_training_curves, read_scalars

EVAL_SETS = ("Set5", "Set14", "BSD68")
DOWNSCALING = ("bilinear", "bicubic", "nearest")  # how the LR input is made at test time
SCALE = 2  # the runs of experiments.RUNS, and the published results below, are x2
# Published x2 results of the standard protocol (Y channel, MATLAB bicubic LR, 2 px shaved border):
# SRCNN (Dong et al. 2016, TPAMI), FSRCNN (Dong et al. 2016, ECCV), VDSR (Kim et al. 2016, CVPR).
PUBLISHED = (("SRCNN (published)", {"Set5": (36.66, 0.9542), "Set14": (32.42, 0.9063)}),
             ("FSRCNN (published)", {"Set5": (37.00, 0.9558), "Set14": (32.63, 0.9088)}),
             ("VDSR (published)", {"Set5": (37.53, 0.9587), "Set14": (33.03, 0.9124)}))
# Crops for the visual comparison: (eval set, image, top, left, side) in HR pixels.
CROPS = (("Set14", "comic.png", 40, 60, 96), ("Set14", "zebra.png", 80, 300, 96), ("Set5", "butterfly.png", 90, 100, 96))
PLATEAU_FRACTION, PLATEAU_DB = 0.2, 0.05
MARKER = re.compile(r"(<!-- report:(?P<name>[\w-]+) -->\n)(.*?)(<!-- /report:(?P=name) -->)", re.S)


def plateau(steps, values, fraction=PLATEAU_FRACTION, tolerance=PLATEAU_DB):
    """The convergence criterion: (gain, met), where gain is the best validation PSNR over the last
    `fraction` of the steps minus the best one before them; met when gain < `tolerance` dB."""
    cut = steps[-1] * (1 - fraction)
    before = [v for s, v in zip(steps, values) if s <= cut]
    after = [v for s, v in zip(steps, values) if s > cut]
    if not before or not after:
        return math.nan, False
    gain = max(after) - max(before)
    return gain, gain < tolerance


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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

    def diverged_at(self):
        steps, values = self.scalars.get(f"train/{LOSS_NAME}", ([], []))
        return steps[-1] if values and not math.isfinite(values[-1]) else None

    def load(self, device):
        return load_model(self.checkpoint, device)

    def status(self, step):
        if self.diverged_at() is not None:
            last = f"step {step}" if step is not None else "none"
            return f"diverged at step {self.diverged_at()}; last finite checkpoint: {last}"
        if step is None:  # started, logging, but not yet at its first checkpoint
            return "in progress: no checkpoint yet"
        if step < self.planned:
            return f"in progress: step {step} of {self.planned}"
        return "done"

    def label(self, payload):
        text = f"{self.name} ({payload['config']['model']}, step {payload['step']})"
        return text if payload["step"] >= self.planned else f"{text} [{self.status(payload['step'])}]"


def available_runs(cfg):
    """The runs of experiments.RUNS that have logs or a checkpoint (a run that diverged before its
    first checkpoint has only logs: it appears in the plots and the runs table, not in evaluations)."""
    runs = [Run(name, settings, cfg) for name, settings in RUNS]
    return [run for run in runs if run.checkpoint is not None or run.scalars]


def with_models(runs):
    return [run for run in runs if run.checkpoint is not None]


def runs_table(runs):
    """Steps, wall time, hardware, validation PSNR and the plateau criterion of every run."""
    lines = ["| run | model | lr | steps | wall time | hardware | final val PSNR (dB) | best val PSNR (dB) "
             "| gain over the last 20% (dB) | status |", "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for run in runs:
        payload = load_checkpoint(run.checkpoint) if run.checkpoint else {"step": None, "config": {}}
        train_config = run.train_config
        elapsed = run.summary.get("wall_time_s", payload.get("elapsed"))
        hardware = run.summary.get("hardware", payload.get("hardware", "not recorded"))
        steps, psnrs = run.scalars.get("val/psnr", ([], []))
        # a fine-tune's best is near its start by design: the criterion only means something from scratch
        fine_tune = bool(run.init)
        gain, met = plateau(steps, psnrs) if steps and not fine_tune else (math.nan, False)
        status = run.status(payload["step"])
        if status == "done" and not fine_tune:
            status = f"done; plateau {'met' if met else 'not met'} (< {PLATEAU_DB} dB)"
        gain_cell = "—" if math.isnan(gain) else f"{gain:+.3f}"
        psnr_cells = f"{psnrs[-1]:.2f} | {max(psnrs):.2f} | {gain_cell}" if psnrs else "— | — | —"
        wall = "—" if elapsed is None else f"{elapsed / 3600:.2f} h"
        model = train_config["model"]
        if fine_tune:  # its steps and wall time come on top of those of its init
            model += f" (init: {run.init})"
        lines.append(f"| {run.name} | {model} | {train_config['lr']:g} "
                     f"| {'—' if payload['step'] is None else payload['step']} | {wall} "
                     f"| {hardware} | {psnr_cells} | {status} |")
    return "\n".join(lines) + "\n"


def methods(runs, device):
    """(label, upscale) of the interpolation baselines, then of each run's model."""
    return ([(f"{mode} upsampling", lambda lr, m=mode: interpolate(lr, SCALE, m)) for mode in ("bilinear", "bicubic")]
            + [(run.label(payload), model) for run in runs for model, payload in [run.load(device)]])


class Scores:
    """evaluate() of each (method, set, degradation) once per report: the tables share many cells
    (Set14 and BSD68 with bilinear LR appear in three of them)."""

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


def eval_table(runs, set_name, degradation, scores):
    """The Task 4 table (RGB in [0, 1]) on one evaluation set, LR made by `degradation`."""
    rows = [(name, scores(name, upscale, set_name, degradation)) for name, upscale in methods(runs, scores.device)]
    return markdown_table(f"x2 on {set_name} ({len(scores.dataset(set_name, degradation))} images), LR by "
                          f"{degradation} downscaling, RGB in [0, 1]", rows)


def downscaling_table(runs, set_name, scores):
    """PSNR/SSIM with LR inputs made by other downscaling than the bilinear one of training."""
    header = " | ".join(f"LR by {d}" for d in DOWNSCALING)
    lines = [f"x2 on {set_name}, PSNR (dB) / SSIM by how the LR input was made (training used bilinear)", "",
             f"| method | {header} |", "|---|" + "---:|" * len(DOWNSCALING)]
    for name, upscale in methods(runs, scores.device):
        cells = [scores(name, upscale, set_name, d) for d in DOWNSCALING]
        lines.append(f"| {name} | " + " | ".join(f"{m['psnr']:.2f} / {m['ssim']:.4f}" for m in cells) + " |")
    return "\n".join(lines) + "\n"


def standard_table(runs, device):
    """x2 in the SR papers' protocol (metrics.evaluate_standard) beside published results."""
    sets = ("Set5", "Set14")
    rows = [("bicubic (MATLAB imresize)", lambda lr: imresize_matlab(lr, SCALE), "—")]
    for run in runs:
        model, payload = run.load(device)
        trained = run.train_config["degradation"]
        rows.append((run.label(payload), model, trained))
        if trained == "bicubic_matlab":
            rows.append((run.label(payload) + " + x8 self-ensemble", self_ensemble(model), trained))
    header = " | ".join(f"{s} PSNR / SSIM" for s in sets)
    lines = ["x2, standard protocol: LR by MATLAB bicubic imresize, 8-bit outputs, Y channel, 2 px border "
             "shaved", "", f"| method | trained on LR by | {header} |", "|---|---|" + "---:|" * len(sets)]
    for name, upscale, trained in rows:
        cells = [evaluate_standard(upscale, standard_set(os.path.join(DATA_ROOT, s), SCALE), SCALE, device) for s in sets]
        lines.append(f"| {name} | {trained} | " + " | ".join(f"{m['psnr']:.2f} / {m['ssim']:.4f}" for m in cells) + " |")
    for name, values in PUBLISHED:
        lines.append(f"| {name} | bicubic | " + " | ".join(f"{values[s][0]:.2f} / {values[s][1]:.4f}" for s in sets) + " |")
    return "\n".join(lines) + "\n"


def sharpness_table(runs, set_names, scores, extra=()):
    """PSNR, SSIM and sharpness (gradient energy relative to HR, metrics.sharpness) side by side: what
    pixel metrics reward against how much detail the output has. `extra`: more (label, upscale) rows."""
    header = " | ".join(f"{s} PSNR / SSIM / sharpness" for s in set_names)
    lines = ["x2, LR by bilinear downscaling; sharpness = gradient energy of the output / that of HR (1 = as much "
             "detail as HR)", "", f"| method | {header} |", "|---|" + "---:|" * len(set_names)]
    for name, upscale in [*methods(runs, scores.device), *extra]:
        cells = [scores(name, upscale, s) for s in set_names]
        lines.append(f"| {name} | " + " | ".join(f"{m['psnr']:.2f} / {m['ssim']:.4f} / {m['sharpness']:.3f}"
                                                 for m in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(runs, out_path, title, max_step=None, labels=None):
    """Train L1 (log scale), validation PSNR and SSIM of several runs on shared axes; a diverged run
    is drawn up to its last finite value and marked with an x."""
    panels = ((f"train/{LOSS_NAME}", "train L1", "log"), ("val/psnr", "validation PSNR (dB)", "linear"),
              ("val/ssim", "validation SSIM", "linear"))
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for run in runs:
        label = (labels or {}).get(run.name, run.name)
        for axis, (tag, _, _) in zip(axes, panels):
            steps, values = run.scalars.get(tag, ([], []))
            points = [(s, v) for s, v in zip(steps, values) if max_step is None or s <= max_step]
            finite = [(s, v) for s, v in points if math.isfinite(v)]
            if not finite:
                continue
            line, = axis.plot(*zip(*finite), label=label, linewidth=1, marker="." if len(finite) < 30 else None)
            if len(finite) < len(points):  # diverged after the last finite point
                axis.plot(*finite[-1], marker="x", color=line.get_color(), markersize=8)
    for axis, (_, name, yscale) in zip(axes, panels):
        axis.set(title=name, xlabel="step", yscale=yscale)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return out_path


@torch.inference_mode()
def plot_crops(runs, out_path, device):
    """Zoomed crops, one row per image: LR (pixels enlarged), bicubic upsampling, each model, HR."""
    models = [(run.name, run.load(device)[0]) for run in runs]
    columns = 3 + len(models)
    figure, axes = plt.subplots(len(CROPS), columns, figsize=(2.1 * columns, 2.3 * len(CROPS)), squeeze=False)
    for row, (set_name, file_name, top, left, side) in enumerate(CROPS):
        high_res = crop_to_multiple(to_float(decode_image(os.path.join(DATA_ROOT, set_name, file_name))), SCALE)
        low_res = degrade(high_res, SCALE, "bilinear")[None].to(device)
        images = [("LR (bilinear down)", low_res.repeat_interleave(SCALE, -2).repeat_interleave(SCALE, -1)),
                  ("bicubic", interpolate(low_res, SCALE, "bicubic"))]
        images += [(name, model(low_res).clamp(0, 1)) for name, model in models]
        images.append(("HR", high_res[None]))
        for column, (name, image) in enumerate(images):
            crop = image[0, :, top:top + side, left:left + side].mul(255).round().byte().permute(1, 2, 0).cpu()
            axis = axes[row, column]
            axis.imshow(crop.numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title(name, fontsize=8)
        axes[row, 0].set_ylabel(f"{set_name}/{file_name}", fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return out_path


def image_block(path, caption):
    return f"![{caption}]({path})\n\n*{caption}*\n"


def start_of(fine_tunes, cfg, device):
    """(label, model) of the checkpoints the fine-tunes started from: the run they came from may have
    trained on since (the residual run went on from 20000 to 30000 steps after gan started from it)."""
    rows = []
    for run in fine_tunes:
        path = os.path.join(cfg["ckpt_dir"], run.init)
        if run.init and os.path.isfile(path):
            model, payload = load_model(path, device)
            rows.append((f"{run.init} ({payload['config']['model']}, step {payload['step']}; {run.name}'s start)", model))
    return rows


def build(cfg, out_dir, device, only=None):
    """Write every table (.md) and figure (.png) of the report to `out_dir`; returns {block name: markdown}.
    `only` (a set of block names) limits the work, for tests."""
    runs = available_runs(cfg)
    by_name = {run.name: run for run in runs}
    evaluated = with_models(runs)
    scores = Scores(device)
    os.makedirs(out_dir, exist_ok=True)
    blocks = {}

    def want(name):
        return only is None or name in only

    def table(name, make):
        if want(name):
            blocks[name] = make()
            with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
                f.write(blocks[name])

    def figure(name, caption, make):
        if want(name):
            path = os.path.join(out_dir, f"{name}.png")
            make(path)
            blocks[name] = image_block(path, caption)

    table("runs", lambda: runs_table(runs))
    if "baseline" in by_name:
        figure("baseline-curves", "Baseline (BasicSRModel, lr 1e-4): train L1, validation L1, PSNR and SSIM on Set5",
               lambda path: plot_training_curves(by_name["baseline"].run_dir, path))
    fp32_dir = os.path.join(cfg["runs_dir"], "baseline_fp32")  # the baseline's first steps in fp32, kept for this
    if "baseline" in by_name and os.path.isdir(fp32_dir):
        fp32 = Run("baseline_fp32", dict(RUNS)["baseline"], cfg)
        last = fp32.scalars[f"train/{LOSS_NAME}"][0][-1]
        figure("precision", f"The baseline in fp32 (stopped at step {last}) and in bf16 autocast (the run above), "
               f"same seed and data", lambda path: plot_comparison(
                   [fp32, by_name["baseline"]], path, "fp32 vs bf16 autocast", max_step=last,
                   labels={"baseline_fp32": "fp32", "baseline": "bf16 autocast"}))
    pair = [by_name[n] for n in ("baseline", "residual") if n in by_name]
    figure("residual-curves", "Baseline vs residual model, same seed and data order",
           lambda path: plot_comparison(pair, path, "baseline vs residual"))
    sweep = [by_name[n] for n, _ in RUNS if n.startswith("lr_") and n in by_name]
    figure("lr-sweep", "Learning-rate sweep of BasicSRModel; lr 1e-4 is the baseline's first 5000 steps; "
           "x = diverged", lambda path: plot_comparison(
               sweep + pair[:1], path, "learning-rate sweep", max_step=5000, labels={"baseline": "lr_1e-4 (baseline)"}))
    for set_name in EVAL_SETS:
        table(f"eval-{set_name}", lambda s=set_name: eval_table(evaluated, s, "bilinear", scores))
    table("downscaling", lambda: downscaling_table(with_models(pair), "Set14", scores))
    table("standard", lambda: standard_table([r for r in evaluated if not r.name.startswith("lr_")], device))
    gan = [by_name["gan"]] if "gan" in by_name else []
    if gan:
        figure("gan-curves", "GAN run: generator L1 and adversarial loss, discriminator loss and outputs, validation",
               lambda path: plot_training_curves(gan[0].run_dir, path))
    elif want("gan-curves"):
        blocks["gan-curves"] = "*No GAN run yet: `python code/experiments.py gan` once the residual run has finished.*\n"
    table("gan", lambda: sharpness_table(with_models(pair + gan), ("Set14", "BSD68"), scores, start_of(gan, cfg, device)))
    figure("crops", "Zoomed crops (x2): LR input, bicubic upsampling, the models, HR",
           lambda path: plot_crops(with_models(pair + gan), path, device))
    return blocks


def fill_markers(text, blocks):
    """Replace the body of each `<!-- report:NAME -->` block whose NAME is in `blocks`."""
    def replace(match):
        name = match.group("name")
        return match.group(0) if name not in blocks else f"{match.group(1)}{blocks[name]}{match.group(4)}"
    return MARKER.sub(replace, text)


def render_pdf(markdown_path, pdf_path):
    """README.md -> README.pdf with markdown-pdf (PyMuPDF); fixed metadata so a rerun gives the same file."""
    from markdown_pdf import MarkdownPdf, Section

    css = ("body {font-size: 10pt;} table {border-collapse: collapse; font-size: 8pt;} "
           "th, td {border: 1px solid #999; padding: 2px 4px;} img {width: 100%;} "
           "pre, code {font-size: 7.5pt;}")
    pdf = MarkdownPdf(toc_level=2, optimize=True)
    pdf.meta.update({"creationDate": "", "modDate": "", "title": "x2 single-image super-resolution"})
    with open(markdown_path) as f:
        pdf.add_section(Section(f.read(), root=os.path.dirname(os.path.abspath(markdown_path))), user_css=css)
    pdf.save(pdf_path)
    return pdf_path


def main(argv):
    if argv == ["pdf"]:  # after editing README.md's prose: render it again without evaluating anything
        print(render_pdf("README.md", "README.pdf"))
        return
    cfg = config.from_argv(argv, ("report", "run", "system"))
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    device = system.pick_device(cfg["device"])
    for set_name in ("T91", *EVAL_SETS):
        if not os.path.isdir(os.path.join(DATA_ROOT, set_name)):
            raise SystemExit(f"error: {DATA_ROOT}/{set_name}: no such folder; the report evaluates on the standard sets")
    out_dir = cfg["report_dir"] or os.path.join(cfg["runs_dir"], "report")
    blocks = build(cfg, out_dir, device)
    with open("README.md") as f:
        text = f.read()
    missing = [name for name in blocks if f"<!-- report:{name} -->" not in text]
    if missing:
        raise SystemExit(f"error: README.md has no <!-- report:{missing[0]} --> block for the generated {missing[0]}")
    with open("README.md", "w") as f:
        f.write(fill_markers(text, blocks))
    print(f"wrote {len(blocks)} blocks to {out_dir} and README.md; {render_pdf('README.md', 'README.pdf')}")


if __name__ == "__main__":
    main(sys.argv[1:])
