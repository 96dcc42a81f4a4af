"""checkpoints.py: the one checkpoint format, safe loading, one-line errors."""
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch

import checkpoints
from checkpoints import WHAT_LOADS, CheckpointError, load_model, save_checkpoint
from conftest import photo_crops, write_folder
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
    without_run = tmp_path / "without_run.pt"  # what evaluate's table and the pages name a model by: refused here, once
    torch.save({"model": {}, "config": {"model": "basic"}, "step": 1}, without_run)
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this repo \(expected keys 'model', 'config', 'step' and 'run'\)"):
        load_model(str(without_run))
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint but a text file starting 'not a checkpoint'"):
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


def test_a_run_folder_stands_for_its_model_pt_and_says_so(tmp_path, capsys):
    run = tmp_path / "final"
    save_checkpoint(str(run / "model.pt"), build_model(small_cfg()), small_cfg(), step=7)
    _, payload = load_model(str(run))
    assert payload["step"] == 7
    assert capsys.readouterr().err == f"note: {run} is a folder; using its {run / 'model.pt'}\n"


def test_a_folder_without_model_pt_is_refused_naming_the_files_to_give(tmp_path):
    run = tmp_path / "stopped"
    save_checkpoint(str(run / "step000010.pt"), build_model(small_cfg()), small_cfg(), step=10)
    with pytest.raises(CheckpointError, match=r"stopped: is a folder without a model.pt; give one of its files "
                                              r"\(step000010.pt\)$"):
        load_model(str(run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty: is a folder without a model.pt; give a checkpoint file, e.g. "):
        load_model(str(tmp_path / "empty"))


def write_text(path, text):
    path.write_text(text)


def write_zip(path, text):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", text)


def write_png(path, text):
    os.replace(os.path.join(write_folder(path.parent / "images", photo_crops(40, 1)), "img00.png"), path)


@pytest.mark.parametrize("write, content, kind", [
    (write_text, "", "an empty file"),
    (write_text, "lr=1e-4\nsteps=10\n", "a text file starting 'lr=1e-4'"),
    (write_text, json.dumps({"model": "basic", "channels": 64}), "a JSON file"),
    (write_zip, "hello", "a zip archive that torch did not write (holding readme.txt)"),
    (write_png, None, "an image (PNG, 40x40 px)"),
], ids=["empty", "text", "json", "zip", "png"])
def test_a_file_of_another_kind_is_named_with_what_loads_instead(tmp_path, write, content, kind):
    """Instead of torch's own words for a file it cannot read ('Unsupported operand 123' for a JSON)."""
    path = tmp_path / "model.pt"
    write(path, content)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path))
    assert str(caught.value) == f"{path}: not a checkpoint but {kind}; {WHAT_LOADS}"


def test_a_safetensors_file_is_refused_in_one_plain_line(tmp_path):
    """Recognised from its bytes (a JSON header after its length), whatever its name; no 'pip install' advice,
    which would not make it load."""
    weights = torch.arange(4, dtype=torch.float32)
    header = json.dumps({"body.0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "weights.bin"
    path.write_bytes(struct.pack("<Q", len(header)) + header + weights.numpy().tobytes())
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path))
    assert str(caught.value) == (f"{path}: not a checkpoint but a safetensors file, a format this project does not "
                                 f"read; {WHAT_LOADS}")


def test_a_truncated_checkpoint_keeps_torchs_reason(tmp_path):
    """A damaged file of torch's own format is not described as a foreign zip."""
    path = save_checkpoint(str(tmp_path / "m.pt"), build_model(small_cfg()), small_cfg(), step=1)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match=r"m.pt: not a readable checkpoint \(.*zip archive"):
        load_model(path)


def test_a_ctrl_c_inside_torch_save_stops_as_itself_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A second Ctrl-C (train.StopNow, a KeyboardInterrupt) in the middle of torch.save surfaces as the zip writer's
    'unexpected pos' RuntimeError; it must leave as the interrupt, so that train() ends in its one line."""
    import models

    model = models.build_model({"model": "basic", "num_blocks": 1, "channels": 4, "scale": 2})
    cfg = {"model": "basic", "num_blocks": 1, "channels": 4, "scale": 2, "run": "r"}
    path = str(tmp_path / "step000010.pt")
    save_checkpoint(path, model, cfg, 5)
    before = open(path, "rb").read()

    def interrupted(payload, f):
        f.write(b"partial")
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 18624 vs 18576")

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, cfg, 10)
    assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["step000010.pt"]


def test_step_checkpoints_are_ordered_by_step_number_and_other_files_left_out(tmp_path):
    for step in (999_500, 1_000_000, 500):
        with open(checkpoints.step_path(str(tmp_path), step), "wb"):
            pass
    (tmp_path / "step_old.pt").write_bytes(b"")
    assert [os.path.basename(p) for p in checkpoints.step_checkpoints(str(tmp_path))] == [
        "step1000000.pt", "step999500.pt", "step000500.pt"]  # as strings, step999500.pt would come first
