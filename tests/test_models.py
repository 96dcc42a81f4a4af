import pytest
import torch

import models
from models import BasicSRModel, count_parameters


def test_default_model_has_the_handouts_parameter_count():
    assert count_parameters(BasicSRModel()) == 372803


def test_model_upscales_by_two_and_is_built_from_the_handouts_blocks():
    model = BasicSRModel(num_blocks=2, channels=8)
    out = model(torch.rand(2, 3, 10, 12))
    assert out.shape == (2, 3, 20, 24)
    kinds = {type(layer) for layer in model.body}
    assert kinds == {torch.nn.Conv2d, torch.nn.LeakyReLU}
    assert all(layer.kernel_size == (3, 3) for layer in model.body if isinstance(layer, torch.nn.Conv2d))


def test_residual_model_adds_the_bilinear_upsampling():
    model = BasicSRModel(num_blocks=1, channels=4, residual=True)
    for param in model.body[-1].parameters():
        torch.nn.init.zeros_(param)  # the body now predicts 0: output = bilinear upsampling
    low_res = torch.rand(1, 3, 8, 8)
    expected = torch.nn.functional.interpolate(low_res, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(low_res), expected)
    assert count_parameters(model) == count_parameters(BasicSRModel(num_blocks=1, channels=4))


def test_discriminator_gives_one_logit_per_image_for_any_patch_size():
    discriminator = models.Discriminator()
    assert models.count_parameters(discriminator) == 1_238_305
    for size in (64, 96, 128):
        assert discriminator(torch.rand(3, 3, size, size)).shape == (3,)


def test_the_discriminator_gives_its_stage_features_and_the_same_logit_with_them():
    discriminator = models.Discriminator(channels=8)
    images = torch.rand(2, 3, 64, 64)
    logits, stages = discriminator(images, with_features=True)
    assert torch.equal(logits, discriminator(images))
    assert [tuple(stage.shape) for stage in stages] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8), (2, 64, 4, 4)]


def test_a_spectrally_normalised_discriminator_has_layers_of_unit_largest_singular_value():
    discriminator = models.Discriminator(channels=8, spectral=True)
    for _ in range(20):  # the power iteration runs once per training-mode call
        discriminator(torch.rand(2, 3, 64, 64))
    discriminator.eval()
    with torch.no_grad():
        largest = torch.linalg.matrix_norm(discriminator.features[0].weight.flatten(1), ord=2).item()
        plain = torch.linalg.matrix_norm(models.Discriminator(channels=8).features[0].weight.flatten(1), ord=2).item()
    assert largest == pytest.approx(1.0, rel=0.05) and plain != pytest.approx(1.0, rel=0.05)
