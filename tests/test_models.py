import os
import pickle

import pytest
import torch

import models
from models import BasicSRModel, CheckpointError, build_model, count_parameters, load_model, save_checkpoint


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


def small_cfg(**changes):
    cfg = {"model": "basic", "num_blocks": 1, "channels": 8, "scale": 2, "run": "t"}
    cfg.update(changes)
    return cfg


def test_checkpoint_round_trip(tmp_path):
    cfg = small_cfg(model="residual")
    model = build_model(cfg)
    path = save_checkpoint(str(tmp_path / "m.pt"), model, cfg, step=5)
    loaded, payload = load_model(path)
    assert payload["step"] == 5 and payload["config"]["model"] == "residual" and loaded.residual
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_checkpoint_of_another_architecture_names_the_mismatch(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, build_model(small_cfg(channels=8)), small_cfg(channels=8), step=1)
    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = 16  # stored config now disagrees with the stored weights
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"weights do not fit the model \(shape: body.0.weight"):
        load_model(path)


def test_foreign_files_are_refused_in_one_line(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not a checkpoint of this repo"):
        load_model(str(plain))
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(str(text))
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(str(tmp_path / "missing.pt"))


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit(), "config": {}}, f, protocol=2)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        models.load_checkpoint(str(path))
    assert not _Exploit.marker.exists()


def test_discriminator_gives_one_logit_per_image_for_any_patch_size():
    discriminator = models.Discriminator()
    assert models.count_parameters(discriminator) == 1_238_305
    for size in (64, 96, 128):
        assert discriminator(torch.rand(3, 3, size, size)).shape == (3,)
