"""checkpoints.py: the one checkpoint format, safe loading, one-line errors."""
import os
import pickle

import pytest
import torch

import checkpoints
from checkpoints import CheckpointError, load_model, save_checkpoint
from models import build_model


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
        checkpoints.load_checkpoint(str(path))
    assert not _Exploit.marker.exists()


def test_a_whole_pickled_model_is_refused_in_one_plain_line(tmp_path):
    """torch.save(model) instead of its state_dict: the reason and the fix, without torch's ANSI-coloured advice."""
    path = tmp_path / "whole.pt"
    torch.save(build_model(small_cfg()), path)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "torch.save(model)" in message and "state_dict()" in message
    assert "\n" not in message and "\x1b" not in message
