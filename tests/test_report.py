import math
import os
import re
import shutil

import pytest
import torch

import config
import report
import train
from conftest import shared_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plateau_compares_the_best_psnr_of_the_last_fifth_with_the_best_before_it():
    steps = list(range(500, 10001, 500))
    rising = [20 + 0.1 * i for i in range(len(steps))]
    gain, met = report.plateau(steps, rising)
    assert gain == pytest.approx(rising[-1] - rising[15]) and not met  # cut at step 8000 = index 15
    flat_but_noisy = [30.0 + (0.5 if i % 2 else 0.0) for i in range(len(steps))]
    assert report.plateau(steps, flat_but_noisy) == (0.0, True)
    assert report.plateau([500], [30.0]) == (pytest.approx(math.nan, nan_ok=True), False)


def test_fill_markers_replaces_only_the_named_blocks_and_keeps_the_text_around():
    text = "intro\n<!-- report:a -->\nold a\n<!-- /report:a -->\nmiddle\n<!-- report:b -->\nold b\n<!-- /report:b -->\n"
    filled = report.fill_markers(text, {"a": "new a\n"})
    assert filled == text.replace("old a\n", "new a\n")
    assert report.fill_markers(filled, {"a": "new a\n"}) == filled  # idempotent


@pytest.fixture
def tiny_experiments(tiny_cfg, tmp_path, monkeypatch):
    """Five tiny runs as the report sees them: one finished, one stopped early, one diverged, one started
    but without a checkpoint yet, a GAN; the eval 'sets' all point at the tiny eval folder."""
    root = tmp_path / "data"
    for name in ("T91", "Set5", "Set14", "BSD68"):
        os.makedirs(root, exist_ok=True)
        os.symlink(tiny_cfg["eval_dir"] if name != "T91" else tiny_cfg["data_dir"], root / name)
    tiny = ["num_blocks=1", "channels=8", "patch_size=32", "batch_size=4", "val_every=2", "ckpt_every=2",
            "log_every=1"]
    runs = [("baseline", [*tiny, "model=basic", "lr=1e-3", "max_steps=6"]),
            ("residual", [*tiny, "model=residual", "lr=1e-3", "max_steps=4"]),
            ("lr_1e-2", [*tiny, "model=basic", "lr=1e12", "max_steps=6"]),
            ("lr_1e-3", [*tiny, "model=basic", "lr=1e-3", "max_steps=6"]),
            ("gan", [*tiny, "model=residual", "gan=true", f"init={tiny_cfg['ckpt_dir']}/residual/model.pt", "lr=1e-3",
                     "max_steps=2"])]
    monkeypatch.setattr(report, "RUNS", runs)
    monkeypatch.setattr(report, "DATA_ROOT", str(root))
    monkeypatch.setattr(report, "CROPS", (("Set5", "img00.png", 4, 4, 24),))
    where = [f"data_dir={root / 'T91'}", f"eval_dir={root / 'Set5'}", f"runs_dir={tiny_cfg['runs_dir']}",
             f"ckpt_dir={tiny_cfg['ckpt_dir']}", "num_workers=0", "device=cpu"]
    for name, settings in runs:
        overrides = settings if name != "baseline" else [*settings, "max_steps=4"]  # stops before its 6 planned
        cfg = config.parse_overrides([*where, f"run={name}", *overrides])
        if name == "lr_1e-2":  # diverges
            with pytest.raises(SystemExit):
                train.train(cfg)
        else:
            train.train(cfg)
    # the report's own view of the baseline must be a step checkpoint: drop the final model.pt
    os.remove(os.path.join(tiny_cfg["ckpt_dir"], "baseline", "model.pt"))
    shutil.rmtree(os.path.join(tiny_cfg["ckpt_dir"], "lr_1e-3"))  # logging, but before its first checkpoint
    return config.parse_overrides(where)


def test_report_labels_unfinished_and_diverged_runs_and_rebuilds_the_same_bytes(tiny_experiments, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    blocks = report.build(tiny_experiments, str(first), torch.device("cpu"))
    report.build(tiny_experiments, str(second), torch.device("cpu"))
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second)) and len(names) == 12
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    runs = blocks["runs"]
    assert re.search(r"\| baseline \| basic \| 0\.001 \| 4 \|.*\| in progress: step 4 of 6 \|", runs)
    assert re.search(r"\| residual \| residual \| 0\.001 \| 4 \|.*\| done; plateau (met|not met)", runs)
    assert "| lr_1e-2 |" in runs and re.search(r"diverged at step \d; last finite checkpoint: none", runs)
    assert re.search(r"\| lr_1e-3 \| basic \| 0\.001 \| — \|.*\| in progress: no checkpoint yet \|", runs)
    assert re.search(r"\| gan \| residual \(init: residual/model\.pt\) \| 0\.001 \| 2 \|.*\| — \| done \|", runs)  # no plateau
    assert "lr_1e-3" not in blocks["eval-Set5"]
    assert "baseline (basic, step 4) [in progress: step 4 of 6]" in blocks["eval-Set5"]
    assert "residual (residual, step 4) |" in blocks["eval-BSD68"]
    assert "VDSR (published)" in blocks["standard"] and "baseline" in blocks["downscaling"]
    assert blocks["gan-curves"].startswith("![GAN run") and "| gan (residual, step 2) |" in blocks["gan"]
    assert "| residual/model.pt (residual, step 4; gan's start) |" in blocks["gan"]
    assert blocks["crops"].startswith("![Zoomed crops") and str(first / "crops.png") in blocks["crops"]


def test_render_pdf_is_reproducible_and_holds_the_tables(tmp_path):
    pymupdf = pytest.importorskip("pymupdf")
    markdown = tmp_path / "r.md"
    markdown.write_text("# Title\n\n| method | PSNR (dB) |\n|---|---:|\n| bicubic upsampling | 30.79 |\n")
    first = report.render_pdf(str(markdown), str(tmp_path / "a.pdf"))
    second = report.render_pdf(str(markdown), str(tmp_path / "b.pdf"))
    assert open(first, "rb").read() == open(second, "rb").read()
    text = pymupdf.open(first)[0].get_text()
    assert "bicubic upsampling" in text and "30.79" in text


def committed_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        return {m.group("name"): m.group(3) for m in report.MARKER.finditer(f.read())}


def test_readme_blocks_are_the_committed_report_files():
    blocks = committed_blocks()
    assert {"runs", "eval-Set5", "eval-Set14", "eval-BSD68", "downscaling", "standard", "crops"} <= set(blocks)
    for name, body in blocks.items():
        table = os.path.join(REPO, "runs", "report", f"{name}.md")
        if os.path.isfile(table):
            assert open(table).read() == body, name
        elif body.startswith("!["):
            image = re.match(r"!\[[^]]*\]\(([^)]+)\)", body).group(1)
            assert os.path.isfile(os.path.join(REPO, image)), image
        else:  # a run that does not exist yet says so
            assert body.startswith("*No "), name


def regenerate(tmp_path, only):
    shared_folder("Set5")
    cfg = config.parse_overrides([f"runs_dir={REPO}/runs", f"ckpt_dir={REPO}/checkpoints"])
    cwd = os.getcwd()
    os.chdir(REPO)  # the runs' folders are relative to the repository root
    try:
        report.build(cfg, str(tmp_path), torch.device("cpu"), only=only)
    finally:
        os.chdir(cwd)
    return sorted(os.listdir(tmp_path))


def assert_same_as_committed(tmp_path, names):
    for name in names:
        committed = os.path.join(REPO, "runs", "report", name)
        assert open(tmp_path / name, "rb").read() == open(committed, "rb").read(), f"{name} differs from the committed one"


def test_committed_plots_and_set5_table_are_reproduced_from_the_committed_checkpoints_and_logs(tmp_path):
    names = regenerate(tmp_path, {"runs", "eval-Set5", "baseline-curves", "residual-curves", "lr-sweep"})
    assert len(names) == 5
    assert_same_as_committed(tmp_path, names)


@pytest.mark.slow
def test_the_whole_committed_report_is_reproduced(tmp_path):
    shared_folder("BSD68")
    names = regenerate(tmp_path, None)
    assert names == sorted(os.listdir(os.path.join(REPO, "runs", "report")))
    assert_same_as_committed(tmp_path, names)


def test_report_needs_the_standard_sets_and_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"nowhere/T91: no such folder; the report evaluates on the standard sets"):
        report.main([])
