"""compare.py: a page of checkpoints on an eval folder, scored as evaluate.py scores, the same bytes twice, and bad
input refused in one line with no page (the page itself: test_pages.py)."""
import os

import numpy as np
import pytest
from PIL import Image

import compare
import evaluate
from conftest import run_script
from test_pages import checkpoint, folder_bytes, leftovers, page_data


def test_compare_writes_every_method_scored_as_evaluate_does_and_the_same_bytes_twice(tiny_cfg, tmp_path, capsys):
    path = checkpoint(tiny_cfg, tmp_path)
    out = tmp_path / "page"
    args = [f"checkpoint={path}", f"eval_dir={tiny_cfg['eval_dir']}", f"out={out}", "device=cpu"]
    assert compare.main(args) == str(out / "index.html")
    first = folder_bytes(out)
    compare.main(args)
    assert folder_bytes(out) == first and not leftovers(tmp_path)
    data = page_data(out)
    assert [image["name"] for image in data["images"]] == ["img00.png", "img01.png"]
    names = ["HR", "LR input", "bilinear", "bicubic", "m (basic, step 3)"]
    for image in data["images"]:
        assert [m["name"] for m in image["methods"]] == names
        assert (image["width"], image["height"]) == (48, 48) and image["left"] == "bicubic"
        assert image["right"] == "m (basic, step 3)"
        sizes = [Image.open(out / m["src"]).size for m in image["methods"]]
        assert sizes == [(48, 48), (24, 24), (48, 48), (48, 48), (48, 48)]
    # the HR PNG is the eval image itself, losslessly
    hr = np.asarray(Image.open(out / data["images"][0]["methods"][0]["src"]))
    assert np.array_equal(hr, np.asarray(Image.open(os.path.join(tiny_cfg["eval_dir"], "img00.png"))))
    # per-image scores average to evaluate.py's table
    rows = dict(evaluate.main(args[:2] + [f"out={tmp_path / 'table'}", "device=cpu"]))
    for page_name, table_name in (("bicubic", "bicubic upsampling"), ("m (basic, step 3)", "m (basic, step 3)")):
        scores = [m for image in data["images"] for m in image["methods"] if m["name"] == page_name]
        assert np.mean([m["psnr"] for m in scores]) == pytest.approx(rows[table_name]["psnr"], abs=2e-4)
        assert np.mean([m["ssim"] for m in scores]) == pytest.approx(rows[table_name]["ssim"], abs=2e-5)
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess each: end to end, as the user runs it
@pytest.mark.parametrize("case", ["missing folder", "empty folder", "unreadable checkpoint", "other scale",
                                  "out is another folder", "out under a file"])
def test_bad_input_is_one_line_and_no_page(case, tiny_cfg, tmp_path):
    out, eval_dir, ckpt = tmp_path / "page", tiny_cfg["eval_dir"], checkpoint(tiny_cfg, tmp_path)
    if case == "missing folder":
        eval_dir, expected = tmp_path / "missing", "missing: no such folder"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        eval_dir, expected = tmp_path / "empty", "empty: no image files"
    elif case == "unreadable checkpoint":
        (tmp_path / "bad.pt").write_text("garbage")
        ckpt, expected = tmp_path / "bad.pt", "bad.pt: not a checkpoint but a text file"
    elif case == "other scale":
        ckpt, expected = checkpoint(tiny_cfg, tmp_path, "x4", scale=4), "trained for scale 4, evaluating scale=2"
    elif case == "out is another folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = "exists and is not a comparison page"
    else:
        (tmp_path / "file").write_text("")
        out, expected = tmp_path / "file" / "page", f"cannot write in {tmp_path / 'file'}: it is a file, not a folder"
    status, stderr, _ = run_script("compare.py", [f"checkpoint={ckpt}", f"eval_dir={eval_dir}", f"out={out}",
                                                  "device=cpu"])
    assert status == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and expected in stderr and "Traceback" not in stderr
    assert not os.path.exists(out / "index.html") and leftovers(tmp_path) == []
    if case == "out is another folder":
        assert os.listdir(out) == ["notes.txt"]
