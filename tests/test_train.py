import json
import os
import subprocess
import sys

import pytest
import torch

import train
from conftest import CODE
from plots import read_scalars


def state_dict_of(path):
    return torch.load(path, weights_only=True)["model"]


def test_short_training_writes_checkpoints_logs_and_lowers_the_loss(tiny_cfg):
    summary = train.train(tiny_cfg)
    run_dir = os.path.join(tiny_cfg["runs_dir"], "tiny")
    ckpt_dir = os.path.join(tiny_cfg["ckpt_dir"], "tiny")
    assert summary["steps"] == 20
    assert sorted(os.listdir(ckpt_dir)) == ["config.json", "model.pt", "model_step000010.pt",
                                            "model_step000020.pt", "train_state.pt"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 10_000
    assert json.load(open(os.path.join(run_dir, "config.json"))) == tiny_cfg
    scalars = read_scalars(run_dir)
    steps, losses = scalars["train/l1"]
    assert steps == list(range(1, 21))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert scalars["val/psnr"][0] == [10, 20] and set(scalars) >= {"val/l1", "val/psnr", "val/ssim"}
    assert summary["final_val"]["psnr"] == pytest.approx(scalars["val/psnr"][1][-1], abs=1e-4)


def test_training_is_bit_identical_on_rerun(tiny_cfg, tmp_path):
    train.train(dict(tiny_cfg, max_steps=6))
    first = state_dict_of(os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt"))
    train.train(dict(tiny_cfg, max_steps=6, overwrite=True))
    second = state_dict_of(os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resumed_training_matches_an_uninterrupted_one(tiny_cfg):
    train.train(dict(tiny_cfg, run="straight", max_steps=12))
    train.train(dict(tiny_cfg, run="resumed", max_steps=6, ckpt_every=3, num_workers=2))
    train.train(dict(tiny_cfg, run="resumed", max_steps=12, resume=True))
    straight = state_dict_of(os.path.join(tiny_cfg["ckpt_dir"], "straight", "model.pt"))
    resumed = state_dict_of(os.path.join(tiny_cfg["ckpt_dir"], "resumed", "model.pt"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps, _ = read_scalars(os.path.join(tiny_cfg["runs_dir"], "resumed"))["train/l1"]
    assert steps == list(range(1, 13))


def test_resume_with_other_settings_is_refused(tiny_cfg):
    train.train(dict(tiny_cfg, max_steps=2))
    with pytest.raises(SystemExit, match=r"other settings: lr=0.001 \(now 0.01\)"):
        train.train(dict(tiny_cfg, max_steps=4, lr=1e-2, resume=True))


def test_an_existing_run_is_not_overwritten_unless_asked(tiny_cfg):
    train.train(dict(tiny_cfg, max_steps=2))
    model_path = os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt")
    before = open(model_path, "rb").read()
    with pytest.raises(SystemExit, match="already has .*pass resume=true"):
        train.train(dict(tiny_cfg, max_steps=2))
    assert open(model_path, "rb").read() == before


def test_divergence_stops_cleanly_with_the_step(tiny_cfg, monkeypatch):
    """A NaN in the data poisons the loss at once, as a diverging learning rate does a few steps later."""
    original = train.SRDataset.__getitem__
    monkeypatch.setattr(train.SRDataset, "__getitem__",
                        lambda self, index: tuple(t * float("nan") for t in original(self, index)))
    with pytest.raises(SystemExit, match=r"training loss is nan at step 1 \(diverged\)"):
        train.train(dict(tiny_cfg, max_steps=5))


def test_command_line_trains_and_rejects_bad_keys(tiny_cfg, tmp_path):
    args = [f"{k}={tiny_cfg[k]}" for k in ("data_dir", "eval_dir", "runs_dir", "ckpt_dir", "num_blocks", "channels",
                                           "patch_size", "batch_size", "num_workers")]
    done = subprocess.run([sys.executable, os.path.join(CODE, "train.py"), *args, "max_steps=3", "val_every=3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Using cpu device" in done.stdout and "final model" in done.stdout
    bad = subprocess.run([sys.executable, os.path.join(CODE, "train.py"), "learning_rate=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "unknown key 'learning_rate'" in bad.stderr
