"""Task 5's and Task 6's training runs, the final model and its ablation, as a plain list: train what is missing,
continue what stopped, skip what is done.

    python code/experiments.py                      # every run of RUNS (make experiments); TRIALS only by name
    python code/experiments.py baseline residual    # only these
    python code/experiments.py final_t91 final_no_rescale final ablate_handout ablate_no_jitter ablate_dihedral ablate_cosine ablate_ema
    python code/experiments.py device=cuda num_workers=8   # key=value goes to every run
    SR_DATA_ROOT=/scratch/sets python code/experiments.py  # the standard sets from another folder than data/

Each run is `code/train.py run=<name> <COMMON> <its settings> resume=auto`, so an interrupted
experiment continues exactly where it stopped, on a CPU or a GPU. A diverging run (exit 3) is
reported and the others go on; an interrupted one (Ctrl-C, a scheduler signal: exit 75) stops the list.
Exit status: 75 after an interrupted run (run it again), 1 if a run failed otherwise, else 0.
"""
import os
import subprocess
import sys

import config
from checkpoints import EXIT_DIVERGED, EXIT_INTERRUPTED, CheckpointError, load_checkpoint

DATA_ROOT = config.DATA_ROOT  # T91, BSD200 and Set5: `make data-standard` downloads them (SR_DATA_ROOT=elsewhere)
COMMON = [f"data_dir={DATA_ROOT}/T91", f"eval_dir={DATA_ROOT}/Set5", "val_every=500", "ckpt_every=500"]
FINAL_RECIPE = ["model=residual", "degradation=bicubic_matlab", "jitter=0", "augment=dihedral", "lr=5e-4",
                "lr_schedule=cosine", "warmup_steps=500", "lr_min=1e-6", "ema=0.999"]
FINE_TUNE_291 = [*FINAL_RECIPE, f"data_dir={DATA_ROOT}/T91,{DATA_ROOT}/BSD200", "init=checkpoints/final_t91/model.pt",
                 "batch_size=8", "patch_size=96", "bad_files=skip", "loss_border=12", "lr=2e-4", "warmup_steps=200",
                 "max_steps=12000", "ckpt_every=250"]
# Task 6 v2: the final model fine-tuned as a GAN generator on its own data and degradation
GAN2 = ["model=residual", "gan=true", "init=checkpoints/final/model.pt", "degradation=bicubic_matlab", "jitter=0",
        "augment=dihedral", f"data_dir={DATA_ROOT}/T91,{DATA_ROOT}/BSD200", "scale_augment=0.9,0.8,0.7,0.6", "lr=1e-4",
        "max_steps=2000", "val_every=250", "ckpt_every=250"]
GAN2_DISCRIMINATORS = [("vgg", []), ("sn", ["disc_channels=64", "disc_norm=spectral", "fm_weight=10"])]  # fm: pix2pixHD's 10
ABLATION_BASE = ["model=residual", "degradation=bicubic_matlab"]
ABLATION = [  # each adds one ingredient to the one before; the last is FINAL_RECIPE
    ("ablate_handout", ["lr=1e-4"]),
    ("ablate_no_jitter", ["lr=1e-4", "jitter=0"]),
    ("ablate_dihedral", ["lr=1e-4", "jitter=0", "augment=dihedral"]),
    ("ablate_cosine", ["jitter=0", "augment=dihedral", "lr=5e-4", "lr_schedule=cosine", "warmup_steps=500",
                       "lr_min=1e-6"]),
    ("ablate_ema", FINAL_RECIPE[2:]),
]
RUNS = [
    # converged baseline: the handout's model and learning rate
    ("baseline", ["model=basic", "lr=1e-4", "max_steps=30000"]),
    # residual connection, same steps, seed and data order
    ("residual", ["model=residual", "lr=1e-4", "max_steps=30000", "save_model_at=20000"]),
    # The fine-tuned runs below start from the residual run's model at step 20000 (model_020000.pt, which
    # save_model_at keeps).
    # Task 6: the residual model fine-tuned as a GAN generator (L1 + relativistic adversarial loss)
    ("gan", ["model=residual", "gan=true", "init=checkpoints/residual/model_020000.pt", "lr=1e-4", "max_steps=5000"]),
    # the standard benchmark protocol's degradation (MATLAB bicubic), for the table against SRCNN/FSRCNN/VDSR:
    # the residual model fine-tuned on it (20000 + 3000 steps in all)
    ("residual_matlab", ["model=residual", "degradation=bicubic_matlab", "init=checkpoints/residual/model_020000.pt",
                         "lr=1e-4", "max_steps=3000"]),
    # learning-rate sweep with the original model; the baseline is its lr=1e-4 curve, and lr_1e-4 the baseline's
    # settings rerun to 5000 steps for that step's weights (the baseline kept only its last ones). lr_1e-3 and lr_1e-5
    # go on to the baseline's 30000 steps, keeping their step-5000 weights (make sweep-30k)
    ("lr_1e-2", ["model=basic", "lr=1e-2", "max_steps=5000"]),
    ("lr_1e-3", ["model=basic", "lr=1e-3", "max_steps=30000", "save_model_at=5000"]),
    ("lr_1e-4", ["model=basic", "lr=1e-4", "max_steps=5000"]),
    ("lr_1e-5", ["model=basic", "lr=1e-5", "max_steps=30000", "save_model_at=5000"]),
    ("lr_1e-6", ["model=basic", "lr=1e-6", "max_steps=5000"]),
    # The final model's first stage (final_t91): the residual network trained from scratch on the standard degradation with the recipe
    # of the SR literature (README: Final model): no colour jitter (the benchmarks score colours as they are),
    # the 8 flips/rotations of each crop (EDSR), a short warm-up then cosine decay from a 5x higher peak,
    # and a moving average of the weights. Its last step's (averaged) weights are model.pt: no selection on Set5.
    ("final_t91", [*FINAL_RECIPE, "max_steps=30000"]),
    # The 291 images of the VDSR-era papers (T91 + BSD200), fine-tuned from final_t91: 8 crops of 96x96 (about the
    # pixels of 16 x 64x64: 73,728 against 65,536) with the 12 edge pixels out of the loss (the
    # receptive field's radius), so that the loss sees what a whole test image shows the model; T91's one image
    # under 96 px (t20, 78x78) is left out. A second cosine schedule from a lower peak.
    ("final_no_rescale", FINE_TUNE_291),
    # The final model: the same fine-tune, with each of the 291 images also downscaled by 0.9, 0.8, 0.7 and 0.6
    # (the augmentation of the 291 images in VDSR and DRRN): 1,407 images instead of 290.
    ("final", [*FINE_TUNE_291, "scale_augment=0.9,0.8,0.7,0.6"]),
    # What each ingredient buys: short runs at equal steps, adding them one at a time to the handout's recipe.
    *[(name, [*ABLATION_BASE, *settings, "max_steps=2000", "val_every=250", "ckpt_every=250"])
      for name, settings in ABLATION],
]
# Run only when named, not by `make experiments`: Task 6 v2's short trials, to choose the adversarial weight and the
# discriminator before one long run (meant for a GPU, device=cuda): the handout's discriminator, and a wider one
# with spectral normalisation and feature matching (pix2pixHD's stand-in for a perceptual loss, whose VGG weights
# would be a download), each at the adversarial weights around ESRGAN's 0.005 and Real-ESRGAN's 0.1.
TRIALS = [(f"gan2_{name}_a{weight}", [*GAN2, f"adv_weight={weight}", *discriminator])
          for name, discriminator in GAN2_DISCRIMINATORS for weight in ("0.005", "0.02", "0.1")]
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def run_to_its_end(command):
    """(exit status of `command`, whether a Ctrl-C came meanwhile). A Ctrl-C reaches the training too, which saves a
    checkpoint and exits 75: this process waits for that instead of killing it (as subprocess.run does 0.25 s after
    a KeyboardInterrupt), and the list stops after it however the training ended."""
    process, interrupted = subprocess.Popen(command), False
    while True:
        try:
            return process.wait(), interrupted
        except KeyboardInterrupt:
            interrupted = True


def finished_step(name, settings, overrides):
    """The step of the run's final model.pt if it reached its max_steps, else None."""
    cfg = config.parse_overrides([*COMMON, *settings, *overrides])
    path = os.path.join(cfg["ckpt_dir"], name, "model.pt")
    try:
        step = load_checkpoint(path)["step"] if os.path.isfile(path) else None
    except CheckpointError:
        return None
    return step if step == cfg["max_steps"] else None


def main(argv):
    every = ", ".join(n for n, _ in RUNS) + "; only when named: " + ", ".join(n for n, _ in TRIALS)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nruns: " + every)
        raise SystemExit(0)
    names = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    unknown = set(names) - {name for name, _ in RUNS + TRIALS}
    if unknown:
        raise SystemExit(f"error: unknown run {sorted(unknown)[0]!r}; runs: {every}")
    try:
        config.parse_overrides(overrides)
    except config.ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    outcomes = []
    for name, settings in (RUNS + TRIALS if names else RUNS):
        if names and name not in names:
            continue
        if finished_step(name, settings, overrides) is not None:
            outcomes.append((name, "done before"))
            continue
        print(f"=== {name}: {' '.join([*settings, *overrides])}", flush=True)  # the overrides win
        command = [sys.executable, TRAIN_SCRIPT, f"run={name}", *COMMON, *settings, "resume=auto", *overrides]
        status, interrupted = run_to_its_end(command)
        outcomes.append((name, {0: "trained", EXIT_DIVERGED: "diverged (exit 3)"}.get(status, f"exit {status}")))
        if status == EXIT_INTERRUPTED or interrupted:
            break
    for name, outcome in outcomes:
        print(f"{name:<10} {outcome}")
    return outcomes


def exit_status(outcomes):
    """75 where the list stopped at an interrupted run (so that `make` and job scripts stop and can run it again), 1
    where a run failed otherwise, else 0: a diverged run is a result of the list (a learning rate too high)."""
    codes = [outcome for _, outcome in outcomes if outcome.startswith("exit ")]
    return EXIT_INTERRUPTED if f"exit {EXIT_INTERRUPTED}" in codes else 1 if codes else 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main(sys.argv[1:])))
