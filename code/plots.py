"""Training curves read back from a run's TensorBoard logs, drawn as the handout's Figure 3.

    python code/plots.py run=demo    # writes runs/demo/curves.png
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: works on cluster nodes and CI without a display
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CURVES = (("train/l1", "train L1"), ("val/l1", "validation L1"), ("val/psnr", "validation PSNR (dB)"),
          ("val/ssim", "validation SSIM"))


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


def plot_training_curves(run_dir, out_path):
    """Train L1, validation L1, PSNR and SSIM against the step, one panel each."""
    scalars = read_scalars(run_dir)
    figure, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for axis, (tag, label) in zip(axes, CURVES):
        steps, values = scalars.get(tag, ([], []))
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set(title=label, xlabel="step")
        axis.grid(alpha=0.3)
    figure.suptitle(os.path.basename(os.path.normpath(run_dir)))
    figure.tight_layout()
    figure.savefig(out_path, dpi=100, metadata={"Software": None})
    plt.close(figure)
    return out_path


if __name__ == "__main__":
    import config

    cfg = config.from_argv(sys.argv[1:])
    run_dir = os.path.join(cfg["runs_dir"], cfg["run"])
    if not os.path.isdir(run_dir):
        raise SystemExit(f"error: {run_dir}: no such run folder")
    print(f"wrote {plot_training_curves(run_dir, os.path.join(run_dir, 'curves.png'))}")
