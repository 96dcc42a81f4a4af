import math
"""metrics.py: PSNR, SSIM, sharpness, the RGB evaluation and the standard protocol of the SR literature."""
import pytest
import torch
import torch.nn.functional as F

import metrics
from conftest import shared_folder
from dataset import SRDataset, imresize_matlab


PUBLISHED_BICUBIC = {  # (set, scale): (PSNR, SSIM) of bicubic upsampling in the SR literature
    ("Set5", 2): (33.66, 0.9299), ("Set5", 3): (30.39, 0.8682), ("Set5", 4): (28.42, 0.8104),
    ("Set14", 2): (30.24, 0.8688), ("Set14", 3): (27.55, 0.7742), ("Set14", 4): (26.00, 0.7027),
}


def test_the_loss_leaves_out_the_border_and_is_l1_or_the_mean_squared_error():
    torch.manual_seed(0)
    prediction, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert metrics.loss_function(prediction, target) == F.l1_loss(prediction, target)
    assert metrics.loss_function(prediction, target, "l2") == F.mse_loss(prediction, target)
    spoiled = prediction.clone()
    spoiled[..., :3, :] = spoiled[..., -3:, :] = spoiled[..., :, :3] = spoiled[..., :, -3:] = 100.0  # only the border
    inner = F.l1_loss(prediction[..., 3:-3, 3:-3], target[..., 3:-3, 3:-3])
    assert metrics.loss_function(spoiled, target, "l1", border=3) == inner
    assert metrics.loss_function(spoiled, target, "l1", border=2) > 10 * inner


def test_the_luma_loss_ignores_colour_that_keeps_luma_and_measures_a_luma_error():
    torch.manual_seed(0)
    target = torch.rand(2, 3, 8, 8)
    weights = torch.tensor(metrics.BT601).div(255).view(3, 1, 1)
    chroma_only = torch.tensor([weights[1, 0, 0], -weights[0, 0, 0], 0.0]).view(3, 1, 1)  # orthogonal to the weights
    recoloured = target + 0.1 * chroma_only
    assert metrics.loss_function(recoloured, target, "l2") > 1e-4
    assert metrics.loss_function(recoloured, target, "l2", channels="y") < 1e-12
    brighter = target + 0.1  # every channel: luma rises by 0.1 x the sum of the weights
    expected = (0.1 * weights.sum()) ** 2
    torch.testing.assert_close(metrics.loss_function(brighter, target, "l2", channels="y"), expected)
    # the luma of the standard protocol (metrics.luma: on [0, 255], offset 16, rounded): what the loss compares
    image = torch.rand(3, 8, 8)
    luma_loss = metrics.loss_function(image, torch.zeros_like(image), "l1", channels="y")
    torch.testing.assert_close(luma_loss * 255 + 16, metrics.luma(image * 255).mean(), atol=0.5, rtol=0)


def test_psnr_of_a_known_mse():
    target = torch.zeros(2, 3, 8, 8)
    prediction = torch.full_like(target, 0.1)  # MSE = 0.01
    torch.testing.assert_close(metrics.psnr(prediction, target), torch.tensor([20.0, 20.0]))


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 32, 32)
    assert metrics.ssim(image, image).item() == pytest.approx(1.0, abs=1e-6)
    noisy = (image + 0.2 * torch.randn_like(image)).clamp(0, 1)
    assert metrics.ssim(noisy, image).item() < 0.9


def test_evaluate_averages_over_images(tiny_data):
    ds = SRDataset(tiny_data["eval"], train=False)
    per_image = [metrics.psnr(metrics.interpolate(lr[None], 2, "bicubic"), hr[None]).item() for lr, hr in
                 (ds[i] for i in range(len(ds)))]
    result = metrics.evaluate(lambda lr: metrics.interpolate(lr, 2, "bicubic"), ds, "cpu")
    assert result["psnr"] == pytest.approx(sum(per_image) / len(per_image))
    assert 15 < result["psnr"] < 50 and 0 < result["ssim"] < 1


def test_evaluate_batches_hold_no_more_pixels_than_one_tile(tmp_path):
    """Many small images of one size are batched, but never beyond `batch_pixels` (default: one 512x512 HR tile of
    models.tiled_upscaler), so that a set of small photos needs no more memory than one large photo; same metrics."""
    from conftest import photo_crops, write_folder

    ds = SRDataset(write_folder(tmp_path / "many", photo_crops(48, 12)), train=False)
    batches = []

    def bicubic(low_res):
        batches.append(low_res.shape[0] * low_res.shape[-2] * low_res.shape[-1] * 4)  # HR pixels of the batch
        return metrics.interpolate(low_res, 2, "bicubic")
    small = metrics.evaluate(bicubic, ds, "cpu", batch_pixels=5 * 48 * 48)
    assert batches == [5 * 48 * 48, 5 * 48 * 48, 2 * 48 * 48]
    batches.clear()
    assert metrics.evaluate(bicubic, ds, "cpu") == pytest.approx(small) and batches == [12 * 48 * 48]
    large = SRDataset(write_folder(tmp_path / "large", photo_crops(300, 4)), train=False)
    batches.clear()
    metrics.evaluate(bicubic, large, "cpu")
    assert max(batches) <= 512 * 512 and batches[0] == 2 * 300 * 300  # a third would exceed one tile

@pytest.mark.parametrize("name, scale", list(PUBLISHED_BICUBIC))
def test_standard_protocol_reproduces_the_published_bicubic_baselines(name, scale):
    folder = shared_folder(name)
    images = metrics.standard_set(folder, scale)
    result = metrics.evaluate_standard(lambda lr: imresize_matlab(lr, scale), images, scale, "cpu")
    psnr_db, ssim = PUBLISHED_BICUBIC[(name, scale)]
    assert result["psnr"] == pytest.approx(psnr_db, abs=0.02)
    assert result["ssim"] == pytest.approx(ssim, abs=0.002)


def test_gray_images_are_measured_on_their_own_values_not_on_y_of_replicated_rgb():
    gray = torch.linspace(0, 255, 30 * 30, dtype=torch.float64).reshape(1, 30, 30).round()
    rgb = gray.expand(3, -1, -1)
    assert torch.equal(metrics.luma(gray), gray[0])
    assert metrics.luma(rgb).max() == 235 and metrics.luma(rgb).min() == 16  # the studio range of BT.601
    noisy = (gray + torch.randn_like(gray).mul(3)).clamp(0, 255).round()
    assert metrics.standard_scores(noisy, gray, 2)["psnr"] != metrics.standard_scores(
        noisy.expand(3, -1, -1), rgb, 2)["psnr"]


def test_ssim_agrees_with_scikit_image_and_luma_with_matlab_rgb2ycbcr():
    from skimage.metrics import structural_similarity

    torch.manual_seed(0)
    target = torch.rand(1, 3, 40, 48, dtype=torch.float64)
    prediction = (target + 0.1 * torch.randn_like(target)).clamp(0, 1)
    expected = structural_similarity(prediction[0].numpy(), target[0].numpy(), gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1, channel_axis=0)  # Wang et al.'s SSIM
    assert metrics.ssim(prediction.float(), target.float()).item() == pytest.approx(expected, abs=1e-6)
    primaries = torch.tensor([[255, 0, 0, 255, 0], [0, 255, 0, 255, 0], [0, 0, 255, 255, 0]], dtype=torch.float64)
    assert metrics.luma(primaries[:, None]).tolist() == [[81, 145, 41, 235, 16]]  # rgb2ycbcr: red, green, blue, white, black


def test_the_standard_protocol_shaves_the_border_before_measuring():
    """Gray images: errors in the 2-pixel border do not count; one interior pixel off by 10 over 26x36 pixels."""
    hr = torch.linspace(0, 255, 30 * 40, dtype=torch.float64).reshape(1, 30, 40).round()
    sr = hr.clone()
    sr[:, :2], sr[:, -2:], sr[..., :2], sr[..., -2:] = 0, 0, 255, 255
    sr[0, 10, 10] += 10
    scores = metrics.standard_scores(sr, hr, 2)
    assert scores["psnr"] == pytest.approx(10 * math.log10(255 ** 2 * 26 * 36 / 100))
    assert scores[metrics.LOGGED_L1] == pytest.approx(10 / (26 * 36) / 255)


def test_sharpness_is_one_for_hr_below_one_for_blur_and_above_for_noise():
    torch.manual_seed(0)
    high_res = torch.rand(2, 3, 32, 32)
    blurred = F.avg_pool2d(high_res, 3, stride=1, padding=1, count_include_pad=False)
    assert torch.allclose(metrics.sharpness(high_res, high_res), torch.ones(2))
    assert (metrics.sharpness(blurred, high_res) < 0.6).all()
    smooth = F.interpolate(F.avg_pool2d(high_res, 4), scale_factor=4, mode="bilinear")
    noisy = smooth + 0.2 * torch.randn_like(smooth)
    assert (metrics.sharpness(noisy, smooth) > 2).all()


def test_the_radial_power_spectrum_puts_a_stripe_pattern_in_its_frequencys_ring():
    rows = torch.arange(128, dtype=torch.float32)
    stripes = (0.5 + 0.4 * torch.sin(2 * math.pi * 0.3 * rows))[:, None].expand(128, 128)  # 0.3 cycles/pixel
    spectrum = metrics.radial_power_spectrum(stripes.expand(3, -1, -1), bins=32)
    assert int(spectrum.argmax()) == int(0.3 / 0.5 * 32)


def test_the_high_frequency_gap_is_zero_for_hr_negative_when_smoother_and_rises_with_added_noise():
    from skimage import data

    hr = torch.from_numpy(data.astronaut()[:128, 160:288]).permute(2, 0, 1).float() / 255
    blurred = metrics.interpolate(hr[None, :, ::2, ::2], 2, "bicubic")[0].clamp(0, 1)
    noisy = (blurred + 0.05 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert metrics.high_frequency_gap(hr, hr).item() == 0
    assert metrics.high_frequency_gap(blurred, hr).item() < -3
    assert metrics.high_frequency_gap(noisy, hr).item() > metrics.high_frequency_gap(blurred, hr).item() + 3
    per_ring = metrics.power_ratio_db(blurred, hr)  # what the spectrum figure draws: near 0 dB low, far below high
    assert per_ring.shape == (32,) and per_ring[:4].abs().max() < 1 and per_ring[-4:].max() < -6


def test_the_standard_protocol_scores_a_16_bit_image_as_the_8_bit_one_it_rounds_to(tmp_path):
    from PIL import Image

    from conftest import photo_crops
    pixels = photo_crops(48, 1)[0][..., 1]  # gray: Pillow writes 16-bit gray PNGs
    Image.fromarray(pixels).save(tmp_path / "a8.png")
    (tmp_path / "deep").mkdir()
    Image.fromarray(pixels.astype("uint16") * 257).save(tmp_path / "deep" / "a16.png")
    bicubic = lambda low_res: metrics.interpolate(low_res, 2, "bicubic")  # noqa: E731
    scores = [metrics.evaluate_standard(bicubic, metrics.standard_set(str(folder), 2), 2, "cpu")
              for folder in (tmp_path, tmp_path / "deep")]
    assert scores[0] == scores[1] and 20 < scores[0]["psnr"] < 60
