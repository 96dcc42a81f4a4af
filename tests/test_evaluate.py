import csv
import io
import math

import pytest
import torch

import evaluate
from checkpoints import save_checkpoint
from models import build_model


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


def test_standard_protocol_table_rows(tiny_cfg, tmp_path):
    path = checkpoint(tiny_cfg, tmp_path)
    rows = evaluate.main([f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", "protocol=standard",
                          f"out={tmp_path / 'std'}"])
    assert [name for name, _ in rows] == ["bicubic (MATLAB imresize)", "m (basic, step 3)"]
    assert "standard protocol" in (tmp_path / "std.md").read_text()


