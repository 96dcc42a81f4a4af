"""Task 4: average PSNR / SSIM of checkpoints and of bilinear / bicubic upsampling on an eval folder.

    python code/evaluate.py                                    # every checkpoints/*/model.pt
    python code/evaluate.py checkpoint=checkpoints/demo/model.pt eval_dir=data/Set5
    python code/evaluate.py degradation=nearest                # LR made differently than in training
    python code/evaluate.py protocol=standard eval_dir=data/Set5   # the SR papers' protocol

Prints a Markdown table and saves it as <out>.md and <out>.csv.
"""
import csv
import io
import os
import sys

import config
import system
from checkpoints import CheckpointError, load_models, method_names
from models import tiled_upscaler
from dataset import DataError, SRDataset, imresize_matlab, set_label
from metrics import LOGGED_L1, evaluate, evaluate_standard, interpolate, markdown_table, standard_set


def write_tables(out, title, rows, l1_column=LOGGED_L1):
    """Save the table as <out>.md and <out>.csv (fixed decimals, so reruns are byte-identical), each whole or not
    at all (system.write_file). `l1_column`: the CSV's name for the L1 (the standard protocol's is of the 8-bit
    outputs' Y, divided by 255)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["method", "psnr_db", "ssim", l1_column])
    writer.writerows([name, f"{m['psnr']:.4f}", f"{m['ssim']:.5f}", f"{m[LOGGED_L1]:.5f}"] for name, m in rows)
    for path, text in ((out + ".md", markdown_table(title, rows)), (out + ".csv", table.getvalue())):
        system.write_file(path, text)
    return out + ".md", out + ".csv"


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "evaluate", "eval_dir", "scale", "degradation", "reading", "runs_dir",
                                  "ckpt_dir", "system"))
    system.tune_malloc(cfg)  # whole images: large activations, allocated and freed per batch
    system.bound_kernel_cache()
    device = system.pick_device(cfg["device"])
    standard = cfg["protocol"] == "standard"
    eval_name = set_label(cfg["eval_dir"])
    default_out = f"eval_{eval_name}_standard_x{cfg['scale']}" if standard else f"eval_{eval_name}_{cfg['degradation']}"
    out = cfg["out"] or os.path.join(cfg["runs_dir"], default_out)
    system.check_writable(os.path.dirname(out) or ".")  # before the work, not after it
    try:
        models = load_models(cfg, device)
        # streamed: each image is decoded when it is scored, so memory does not grow with the set
        if standard:
            images = standard_set(cfg["eval_dir"], cfg["scale"], cfg["bad_files"], cfg["max_pixels"], stream=True)
            count = len(images)
        else:
            dataset = SRDataset.from_config(cfg, train=False, stream=True)
            count = len(dataset)
    except (CheckpointError, DataError) as err:
        raise SystemExit(f"error: {err}") from None
    if not models:
        print(f"note: no checkpoint to evaluate (none given, none of this scale under {cfg['ckpt_dir']}/*/model.pt); "
              "baselines only",
              file=sys.stderr)

    def score(upscale):
        upscale = system.with_memory_returned(upscale)
        try:  # an image decoded again may have changed on disk since it was checked
            return evaluate_standard(upscale, images, cfg["scale"], device) if standard else \
                evaluate(upscale, dataset, device)
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
    if standard:
        rows = [("bicubic (MATLAB imresize)", score(lambda lr: imresize_matlab(lr, cfg["scale"])))]
    else:
        rows = [(f"{mode} upsampling", score(lambda lr, m=mode: interpolate(lr, cfg["scale"], m)))
                for mode in ("bilinear", "bicubic")]
    for name, (_, model, _) in zip(method_names(models), models):
        rows.append((name, score(tiled_upscaler(model))))

    if standard:
        title = (f"x{cfg['scale']} on {eval_name} ({count} images), standard protocol: LR by MATLAB bicubic "
                 f"imresize, 8-bit outputs, Y channel (BT.601), {cfg['scale']} px border shaved")
    else:
        title = f"x{cfg['scale']} on {eval_name} ({count} images), LR made by {cfg['degradation']} downscaling"
    print(markdown_table(title, rows))
    with system.failed_writes_exit(out + ".md"):  # a folder removed meanwhile
        for path in write_tables(out, title, rows, "l1_y" if standard else LOGGED_L1):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
