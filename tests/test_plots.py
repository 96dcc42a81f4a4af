import os

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import plots


def test_curves_read_back_from_tensorboard_keep_the_last_value_per_step(tmp_path, caplog):
    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.add_scalar("train/l1", 1.0 / step, step)
    writer.add_scalar("val/psnr", 20.0, 3)
    writer.close()
    writer = SummaryWriter(str(tmp_path), purge_step=3)  # a resumed run rewrites step 3
    writer.add_scalar("train/l1", 0.25, 3)
    writer.close()
    scalars = plots.read_scalars(str(tmp_path))
    assert scalars["train/l1"] == ([1, 2, 3], [1.0, 0.5, 0.25])
    assert caplog.records == []  # TensorBoard's purge warning, printed at every resume=auto, is not news
    out = plots.plot_training_curves(str(tmp_path), str(tmp_path / "curves.png"))
    assert os.path.getsize(out) > 10_000


def test_a_gan_run_gets_panels_for_its_losses_and_discriminator_outputs(tmp_path, monkeypatch):
    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2):
        for tag in ("train/l1", "train/adv", "train/d_loss", "train/d_real", "train/d_fake", "val/psnr"):
            writer.add_scalar(tag, 0.5, step)
    writer.close()
    drawn = []
    original = plots.plt.Axes.plot
    monkeypatch.setattr(plots.plt.Axes, "plot", lambda self, *a, **k: drawn.append(k.get("label")) or original(self, *a, **k))
    plots.plot_training_curves(str(tmp_path), str(tmp_path / "curves.png"))
    run = tmp_path.name
    assert drawn == [run, run, run, f"{run} d_real", f"{run} d_fake", run]  # logged tags only; ssim, sharpness: none


def test_the_split_view_shows_the_left_half_of_one_image_and_the_right_half_of_the_other(tmp_path):
    black, white = torch.zeros(3, 40, 60), torch.ones(3, 40, 60)
    path = plots.plot_split(black, white, str(tmp_path / "split.png"), ("black", "white"))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    rows = pixels[pixels.shape[0] // 2]  # a row through the image: black, the white line, white
    dark = np.flatnonzero(rows < 30)
    assert len(dark) > 0 and rows[dark[-1] + 5:].min() > 225 and dark[0] < len(rows) // 2 < dark[-1] + 10
    framed = plots.plot_split(black, black, str(tmp_path / "framed.png"), ("", ""), window=(10, 5, 20))
    colours = np.asarray(Image.open(framed).convert("RGB"), dtype=int)
    yellow = np.argwhere((colours[..., 0] > 150) & (colours[..., 1] > 150) & (colours[..., 2] < 100))
    assert len(yellow) > 0  # the outline of a window 20 of the image's 60 pixels wide, nothing else yellow
    assert yellow[:, 1].max() - yellow[:, 1].min() < colours.shape[1] * 0.45


def test_spectra_measure_each_output_against_hr_and_a_blur_loses_the_high_frequencies(tmp_path):
    hr = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    blurred = lambda low_res: torch.nn.functional.interpolate(low_res, scale_factor=2, mode="bilinear")
    gaps = plots.plot_spectra(hr, [("HR", "bilinear", None), ("blurred", "bilinear", blurred)], 2, torch.device("cpu"),
                              str(tmp_path / "spectra.png"))
    assert gaps[0] == 0.0 and gaps[1] < -5 and os.path.isfile(tmp_path / "spectra.png")
