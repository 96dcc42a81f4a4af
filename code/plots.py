"""Training curves read back from a run's TensorBoard logs, drawn as the handout's Figure 3.

    python code/plots.py run=demo    # writes runs/demo/curves.png
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on cluster nodes and CI without a display
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metrics import LOSS_NAME

# panels: (tags drawn in it, title)
CURVES = (((f"train/{LOSS_NAME}",), "train L1"), ((f"val/{LOSS_NAME}",), "validation L1"), (("val/psnr",), "validation PSNR (dB)"),
          (("val/ssim",), "validation SSIM"))
GAN_CURVES = (((f"train/{LOSS_NAME}",), "generator L1 (content)"), (("train/adv",), "generator adversarial loss"),
              (("train/d_loss",), "discriminator loss"), (("train/d_real", "train/d_fake"), "D(real), D(fake)"),
              (("val/psnr",), "validation PSNR (dB)"), (("val/ssim",), "validation SSIM"),
              (("val/sharpness",), "validation sharpness (1 = HR)"))


def read_scalars(run_dir):
    """{tag: ([steps], [values])} for every scalar logged in `run_dir`; a resumed run's last value per step wins."""
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        by_step = {e.step: e.value for e in events.Scalars(tag)}
        steps = sorted(by_step)
        scalars[tag] = (steps, [by_step[s] for s in steps])
    return scalars


def plot_training_curves(run_dir, out_path, curves=None):
    """One panel per entry of `curves` against the step: the handout's Figure 3 (CURVES), or for a
    GAN run (one that logged train/adv) its losses and discriminator outputs too (GAN_CURVES)."""
    scalars = read_scalars(run_dir)
    curves = curves or (GAN_CURVES if "train/adv" in scalars else CURVES)
    columns = min(len(curves), 4)
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    for axis, (tags, title) in zip(axes.flat, curves):
        for tag in tags:
            steps, values = scalars.get(tag, ([], []))
            axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=tag.split("/")[-1])
        if len(tags) > 1:
            axis.legend(fontsize=8)
        axis.set(title=title, xlabel="step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(curves):]:
        axis.set_visible(False)
    figure.suptitle(os.path.basename(os.path.normpath(run_dir)))
    figure.tight_layout()
    figure.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return out_path


if __name__ == "__main__":
    import config

    cfg = config.from_argv(sys.argv[1:], ("run",))
    run_dir = os.path.join(cfg["runs_dir"], cfg["run"])
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: {run_dir}: no such run folder")
    print(f"wrote {plot_training_curves(run_dir, os.path.join(run_dir, 'curves.png'))}")
