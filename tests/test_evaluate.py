import csv
import io
import math
import os
import shutil

import pytest
import torch

import evaluate
import metrics
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
    with pytest.raises(SystemExit, match=r"^error: .*bad.pt: not a checkpoint but a text file starting 'garbage'"):
        evaluate.main([f"checkpoint={bad}", f"eval_dir={tiny_cfg['eval_dir']}"])
    with pytest.raises(SystemExit, match="no such folder"):
        evaluate.main([f"eval_dir={tmp_path / 'missing'}", f"ckpt_dir={tmp_path}"])
    path = checkpoint(tiny_cfg, tmp_path)
    with pytest.raises(SystemExit, match="trained for scale 2, evaluating scale=4"):
        evaluate.main([f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", "scale=4"])


def test_checkpoints_found_for_another_scale_are_left_out_with_a_note(tiny_cfg, tmp_path, capsys):
    checkpoint(tiny_cfg, tmp_path)  # x2, found under ckpt_dir: an x4 table has the baselines only
    rows = evaluate.main([f"ckpt_dir={tmp_path / 'checkpoints'}", f"eval_dir={tiny_cfg['eval_dir']}", "scale=4",
                          f"out={tmp_path / 'x4'}", "protocol=standard"])
    assert [name for name, _ in rows] == ["bicubic (MATLAB imresize)"]
    assert "1 of the checkpoints under" in capsys.readouterr().err


def test_standard_protocol_table_rows(tiny_cfg, tmp_path):
    path = checkpoint(tiny_cfg, tmp_path)
    rows = evaluate.main([f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", "protocol=standard",
                          f"out={tmp_path / 'std'}"])
    assert [name for name, _ in rows] == ["bicubic (MATLAB imresize)", "m (basic, step 3)"]
    assert "standard protocol" in (tmp_path / "std.md").read_text()
    assert (tmp_path / "std.csv").read_text().splitlines()[0] == "method,psnr_db,ssim,l1_y"  # not RGB's l1


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["rgb", "standard"])
def test_a_decompression_bomb_gives_one_line_and_little_memory_or_is_skipped(tiny_cfg, tmp_path, protocol):
    import shutil

    from conftest import run_script, write_bomb_png

    folder = tmp_path / "eval"
    shutil.copytree(tiny_cfg["eval_dir"], folder)
    bomb = write_bomb_png(folder / "bomb.png")
    args = [f"eval_dir={folder}", f"protocol={protocol}", f"out={tmp_path / 'table'}", "device=cpu",
            f"ckpt_dir={tmp_path / 'none'}"]
    status, err, peak_mb = run_script("evaluate.py", args)
    assert status == 1 and err.strip().splitlines()[-1] == (
        f"error: {bomb}: 30000x30000 px (900 megapixels) is above max_pixels=100000000; raise max_pixels to read it "
        "(bad_files=skip leaves such files out)")
    assert peak_mb < 1500
    status, err, _ = run_script("evaluate.py", [*args, "bad_files=skip"])
    assert status == 0 and f"warning: skipped {bomb}" in err
    assert "(2 images)" in (tmp_path / "table.md").read_text()


def test_identical_images_are_counted_not_averaged_as_infinity():
    image = torch.rand(1, 3, 16, 16)
    assert metrics.psnr(image, image).item() == pytest.approx(metrics.PSNR_CAP, abs=1e-3)
    table = evaluate.markdown_table("t", [("copy", {"psnr": 100.0, "ssim": 1.0, "identical": 2}),
                                          ("model", {"psnr": 30.0, "ssim": 0.9})])
    assert "| copy | 100.00* | 1.0000 |" in table and "counted as 100 dB: copy 2" in table


def test_flat_images_that_upsampling_reproduces_exactly_are_counted_as_identical(tmp_path):
    from PIL import Image

    from dataset import SRDataset
    for index, colour in enumerate(((200, 30, 90), (12, 240, 128))):
        Image.new("RGB", (40, 32), colour).save(tmp_path / f"flat{index}.png")
    flat_lr_upsampled = lambda low_res: metrics.interpolate(low_res, 2, "bilinear")  # noqa: E731
    result = metrics.evaluate(flat_lr_upsampled, SRDataset(str(tmp_path), scale=2, train=False), torch.device("cpu"))
    assert result["identical"] == 2 and result["psnr"] == pytest.approx(metrics.PSNR_CAP, abs=1e-3)
    images = metrics.standard_set(str(tmp_path), 2)
    standard = metrics.evaluate_standard(lambda low_res: metrics.interpolate(low_res, 2, "bicubic"), images, 2, "cpu")
    assert standard["identical"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["rgb", "standard"])
def test_evaluation_memory_is_bounded_whatever_the_image_size(tiny_cfg, tmp_path, protocol):
    """A 2400x1800 photo through the full-size model: evaluated whole, its activations alone would need over
    4 GB; in tiles, the process stays under 2 GB."""
    import numpy as np
    from PIL import Image

    from conftest import photo_crops, run_script

    folder = tmp_path / "large"
    folder.mkdir()
    Image.fromarray(np.tile(photo_crops(600, 1)[0], (3, 4, 1))).save(folder / "large.png")
    path = checkpoint(dict(tiny_cfg, num_blocks=10, channels=64, model="residual"), tmp_path)
    status, err, peak_mb = run_script("evaluate.py", [f"checkpoint={path}", f"eval_dir={folder}", f"protocol={protocol}",
                                                      f"out={tmp_path / 'table'}", "device=cpu"])
    assert status == 0, err[-2000:]
    assert peak_mb < 2000, peak_mb


def test_a_read_only_out_folder_stops_before_the_work_in_one_line(tiny_cfg, tmp_path, read_only_dir):
    from conftest import refused_before

    path = checkpoint(tiny_cfg, tmp_path)
    out = read_only_dir.path / "tables" / "t"
    args = [f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", f"out={out}", "device=cpu"]
    status, err = refused_before(evaluate, "load_models", "evaluate.py", args, lambda: evaluate.main(args),
                                 read_only_dir.mounted)
    assert status == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write {out.parent}: Read-only file system (") and " MB free on " in err


def test_a_disk_that_fills_while_the_tables_are_written_is_one_line_and_keeps_the_previous_tables(tiny_cfg, tmp_path,
                                                                                                  monkeypatch):
    """A real tmpfs full but for the .md (else ENOSPC mocked on the .csv): the line names the .csv and the space
    left in its folder; the previous .csv is kept whole and no temporary file is left. The second evaluation makes
    other numbers (bicubic LR), so that the kept .csv is the old one and the .md the new one."""
    import errno

    from conftest import mount_tmpfs, unmount

    folder = tmp_path / "small"
    mounted = mount_tmpfs(folder, "size=12k")
    try:
        out = folder / "t"
        args = [f"eval_dir={tiny_cfg['eval_dir']}", f"out={out}", f"ckpt_dir={tmp_path / 'none'}"]
        evaluate.main(args)
        before = {path.name: path.read_bytes() for path in folder.iterdir()}
        if mounted:  # 12k: a page each for the two tables and the filler; the .md is then written again
            (folder / "filler").write_bytes(b"x" * 4096)
            (out.parent / "t.md").unlink()
        else:
            real_replace = os.replace

            def full_disk(source, target):
                if str(target).endswith(".csv"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_replace(source, target)
            monkeypatch.setattr(os, "replace", full_disk)
        with pytest.raises(SystemExit) as stop:
            evaluate.main([*args, "degradation=bicubic"])
        message = str(stop.value.code)
        assert message.startswith(f"error: cannot write {out}.csv: No space left on device (") and "\n" not in message
        assert message.endswith(f" MB free on {folder})")
        assert (folder / "t.csv").read_bytes() == before["t.csv"] and (folder / "t.md").read_bytes() != before["t.md"]
        assert (folder / "t.md").read_text().count("\n") == before["t.md"].decode().count("\n")  # whole
        assert sorted(path.name for path in folder.iterdir()) == sorted({*before, *(["filler"] if mounted else [])})
    finally:
        if mounted:
            unmount(folder)


@pytest.mark.slow
def test_streamed_evaluation_memory_does_not_grow_with_the_number_of_photos(tmp_path):
    """40 photos of 40 sizes from 1024x768 to 712x612, baselines only: streamed (one image decoded at a time) and
    with oneDNN's cache of per-shape convolutions bounded, the process stays near its imports (1.02 GB measured);
    holding the set and a cached convolution per shape took it to 1.32 GB (and 100 photos of 0.5 to 1.2
    megapixels to 2.1 GB)."""
    import numpy as np
    from PIL import Image

    from conftest import photo_crops, run_script

    folder = tmp_path / "photos"
    folder.mkdir()
    crop = photo_crops(256, 1)[0]
    for i in range(40):
        width, height = 1024 - 8 * i, 768 - 4 * i
        pixels = np.tile(crop, (3, 4, 1))[:height, :width]
        Image.fromarray(np.roll(pixels, 7 * i, axis=1)).save(folder / f"p{i:02d}.png")
    status, err, peak_mb = run_script("evaluate.py", [f"eval_dir={folder}", "protocol=standard", "device=cpu",
                                                      f"out={tmp_path / 'table'}", f"ckpt_dir={tmp_path / 'none'}"])
    assert status == 0, err[-2000:]
    assert peak_mb < 1200, peak_mb


def test_two_checkpoints_that_would_read_the_same_are_told_apart_by_their_paths(tiny_cfg, tmp_path):
    first, renamed = checkpoint(tiny_cfg, tmp_path, "a"), checkpoint(tiny_cfg, tmp_path / "old", "a")  # same run name
    rows = evaluate.main([f"checkpoint={first},{renamed}", f"eval_dir={tiny_cfg['eval_dir']}", f"out={tmp_path / 't'}"])
    assert [name for name, _ in rows[2:]] == [f"a (basic, step 3), {first}", f"a (basic, step 3), {renamed}"]


def test_a_table_of_several_sets_is_named_after_all_of_them(tiny_cfg, tmp_path):
    other = shutil.copytree(tiny_cfg["eval_dir"], tmp_path / "Other")
    evaluate.main([f"eval_dir={tiny_cfg['eval_dir']},{other}", f"ckpt_dir={tmp_path / 'none'}", f"runs_dir={tmp_path}"])
    name = f"eval_{os.path.basename(tiny_cfg['eval_dir'])}+Other_bilinear.md"
    assert os.listdir(tmp_path).count(name) == 1  # not eval_Other_bilinear.md, a table of Other alone


@pytest.mark.parametrize("key", ["run=mine", "patch_size=32", "data_dir=data/T91"])
def test_training_keys_are_refused_by_evaluate(key):
    with pytest.raises(SystemExit, match=rf"^config error: {key.split('=')[0]}= is not a setting of this script"):
        evaluate.main([key])
