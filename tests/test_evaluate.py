import csv
import io
import math

import pytest
import torch
import torch.nn.functional as F

import evaluate
from conftest import shared_folder
from models import build_model, save_checkpoint


def test_psnr_of_a_known_mse():
    target = torch.zeros(2, 3, 8, 8)
    prediction = torch.full_like(target, 0.1)  # MSE = 0.01
    torch.testing.assert_close(evaluate.psnr(prediction, target), torch.tensor([20.0, 20.0]))


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    assert evaluate.ssim(image, image).item() == pytest.approx(1.0, abs=1e-6)
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    assert evaluate.ssim(noisy, image).item() < 0.9


def test_evaluate_averages_over_images(tiny_data):
    from dataset import SRDataset

    ds = SRDataset(tiny_data["eval"], train=False)
    per_image = [evaluate.psnr(evaluate.interpolate(lr[None], 2, "bicubic"), hr[None]).item() for lr, hr in
                 (ds[i] for i in range(len(ds)))]
    result = evaluate.evaluate(lambda lr: evaluate.interpolate(lr, 2, "bicubic"), ds, "cpu")
    assert result["psnr"] == pytest.approx(sum(per_image) / len(per_image))
    assert 15 < result["psnr"] < 50 and 0 < result["ssim"] < 1


def checkpoint(tiny_cfg, tmp_path, name="m"):
    torch.manual_seed(0)
    path = str(tmp_path / "checkpoints" / name / "model.pt")
    return save_checkpoint(path, build_model(tiny_cfg), dict(tiny_cfg, run=name), step=3)


def test_table_has_baselines_and_model_rows_and_is_byte_identical_on_rerun(tiny_cfg, tmp_path, capsys):
    path = checkpoint(tiny_cfg, tmp_path)
    args = [f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", f"out={tmp_path / 'table'}", "device=cpu"]
    rows = evaluate.main(args)
    assert [name for name, _ in rows] == ["bilinear upsampling", "bicubic upsampling", "m (basic, step 3)"]
    first = (tmp_path / "table.md").read_bytes(), (tmp_path / "table.csv").read_bytes()
    evaluate.main(args)
    assert ((tmp_path / "table.md").read_bytes(), (tmp_path / "table.csv").read_bytes()) == first
    printed = capsys.readouterr().out
    assert "| bicubic upsampling |" in printed and "| m (basic, step 3) |" in printed
    records = list(csv.DictReader(io.StringIO(first[1].decode())))
    assert [r["method"] for r in records] == [name for name, _ in rows]
    assert all(math.isfinite(float(r["psnr_db"])) and 0 < float(r["ssim"]) < 1 for r in records)


def test_default_finds_every_final_checkpoint(tiny_cfg, tmp_path):
    checkpoint(tiny_cfg, tmp_path, "a")
    checkpoint(tiny_cfg, tmp_path, "b")
    rows = evaluate.main([f"ckpt_dir={tmp_path / 'checkpoints'}", f"eval_dir={tiny_cfg['eval_dir']}",
                          f"runs_dir={tmp_path}", "device=cpu"])
    assert [name.split(" ")[0] for name, _ in rows[2:]] == ["a", "b"]
    assert (tmp_path / "eval_eval_bilinear.md").exists()


def test_degradation_changes_the_lr_input(tiny_cfg, tmp_path):
    results = {d: evaluate.main([f"eval_dir={tiny_cfg['eval_dir']}", f"out={tmp_path / d}", f"degradation={d}",
                                 f"ckpt_dir={tmp_path / 'none'}"])[1][1]["psnr"] for d in ("bilinear", "nearest")}
    assert results["bilinear"] != results["nearest"]


def test_bad_checkpoint_or_folder_stop_with_one_line(tiny_cfg, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("garbage")
    with pytest.raises(SystemExit, match=r"^error: .*bad.pt: not a readable checkpoint"):
        evaluate.main([f"checkpoint={bad}", f"eval_dir={tiny_cfg['eval_dir']}"])
    with pytest.raises(SystemExit, match="no such folder"):
        evaluate.main([f"eval_dir={tmp_path / 'missing'}", f"ckpt_dir={tmp_path}"])
    path = checkpoint(tiny_cfg, tmp_path)
    with pytest.raises(SystemExit, match="trained for scale 2, evaluating scale=4"):
        evaluate.main([f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", "scale=4"])


PUBLISHED_BICUBIC = {  # (set, scale): (PSNR, SSIM) of bicubic upsampling in the SR literature
    ("Set5", 2): (33.66, 0.9299), ("Set5", 3): (30.39, 0.8682), ("Set5", 4): (28.42, 0.8104),
    ("Set14", 2): (30.24, 0.8688), ("Set14", 3): (27.55, 0.7742), ("Set14", 4): (26.00, 0.7027),
}


@pytest.mark.parametrize("name, scale", list(PUBLISHED_BICUBIC))
def test_standard_protocol_reproduces_the_published_bicubic_baselines(name, scale):
    folder = shared_folder(name)
    result = evaluate.evaluate_standard(lambda lr: evaluate.imresize_matlab(lr, scale), folder, scale, "cpu")
    psnr_db, ssim = PUBLISHED_BICUBIC[(name, scale)]
    assert result["psnr"] == pytest.approx(psnr_db, abs=0.02)
    assert result["ssim"] == pytest.approx(ssim, abs=0.002)


def test_gray_images_are_measured_on_their_own_values_not_on_y_of_replicated_rgb():
    gray = torch.linspace(0, 255, 30 * 30, dtype=torch.float64).reshape(1, 30, 30).round()
    rgb = gray.expand(3, -1, -1)
    assert torch.equal(evaluate.luma(gray), gray[0])
    assert evaluate.luma(rgb).max() == 235 and evaluate.luma(rgb).min() == 16  # the studio range of BT.601
    noisy = (gray + torch.randn_like(gray).mul(3)).clamp(0, 255).round()
    assert evaluate.standard_scores(noisy, gray, 2)["psnr"] != evaluate.standard_scores(
        noisy.expand(3, -1, -1), rgb, 2)["psnr"]


def test_standard_protocol_table_rows(tiny_cfg, tmp_path):
    path = checkpoint(tiny_cfg, tmp_path)
    rows = evaluate.main([f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", "protocol=standard",
                          f"out={tmp_path / 'std'}"])
    assert [name for name, _ in rows] == ["bicubic (MATLAB imresize)", "m (basic, step 3)"]
    assert "standard protocol" in (tmp_path / "std.md").read_text()


def test_sharpness_is_one_for_hr_below_one_for_blur_and_above_for_noise():
    torch.manual_seed(0)
    high_res = torch.rand(2, 3, 32, 32)
    blurred = F.avg_pool2d(high_res, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(evaluate.sharpness(high_res, high_res), torch.ones(2))
    assert (evaluate.sharpness(blurred, high_res) < 0.6).all()
    smooth = F.interpolate(F.avg_pool2d(high_res, 4), scale_factor=4, mode="bilinear")
    noisy = smooth + 0.2 * torch.randn_like(smooth)
    assert (evaluate.sharpness(noisy, smooth) > 2).all()
