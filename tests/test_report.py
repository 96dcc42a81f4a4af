import json
import math
import os
import re

import pytest
import torch

import config
import report
import train
from conftest import shared_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_trend_compares_the_last_fifth_with_the_fifth_before_and_says_noisy_where_it_cannot_tell():
    steps = list(range(500, 10001, 500))
    rising = [20 + 0.1 * i for i in range(len(steps))]
    gain, se, verdict = report.trend(steps, rising)
    assert gain == pytest.approx(0.4) and se == pytest.approx(math.sqrt(2 * 0.1 ** 2 * 5 / 3 / 4))
    assert verdict == "rising"
    assert report.trend(steps, [30.0 + 0.001 * (i % 2) for i in range(len(steps))])[2] == "flat"
    noisy_but_flat = [30.0 + (0.5 if i % 2 else 0.0) for i in range(len(steps))]
    assert report.trend(steps, noisy_but_flat)[::2] == (0.0, "no detectable trend (noisy)")  # no power: not "flat"
    noisy_and_rising_a_little = [v + 0.02 * i for i, v in enumerate(noisy_but_flat)]  # 0.08 dB within 2 se
    gain, se, verdict = report.trend(steps, noisy_and_rising_a_little)
    assert gain == pytest.approx(0.08) and gain < 2 * se and verdict == "no detectable trend (noisy)"
    assert math.isnan(report.trend([500], [30.0])[0])


def test_signed_numbers_never_print_minus_zero():
    assert [report.signed(v) for v in (0.126, -0.051, -0.004, 0.0)] == ["+0.13", "-0.05", "0.00", "0.00"]
    assert report.signed_pm(-0.001, 0.004) == "0.00\xa0±\xa00.00"


def test_the_comparison_crop_is_the_square_with_the_largest_mean_gain():
    gain = torch.zeros(64, 80)
    gain[20:36, 44:60] = 1.0
    assert report.pages.focus_window(gain, 16) == {"x": 44, "y": 20, "size": 16}


def test_fill_replaces_every_placeholder_and_refuses_an_unknown_one():
    assert report.fill("a {{x}} b\n{{t}}\n", {"t": "| table |\n"}, {"x": "1.00"}) == "a 1.00 b\n| table |\n"
    with pytest.raises(SystemExit, match=r"quotes \{\{y\}\}, which the report did not compute"):
        report.fill("{{x}} {{y}}", {}, {"x": "1"})


def test_fill_markers_replaces_only_the_named_blocks_and_keeps_the_text_around():
    text = "intro\n<!-- report:a -->\nold a\n<!-- /report:a -->\nmiddle\n<!-- report:b -->\nold b\n<!-- /report:b -->\n"
    filled = report.fill_markers(text, {"a": "new a\n"})
    assert filled == text.replace("old a\n", "new a\n")
    assert report.fill_markers(filled, {"a": "new a\n"}) == filled  # idempotent


@pytest.fixture
def tiny_experiments(tiny_cfg, tmp_path, monkeypatch):
    """Tiny runs as the report sees them: one finished, one stopped early, one diverged, one started but
    without a checkpoint yet, a GAN, a final run and a two-step ablation; the eval 'sets' all point at the
    tiny eval folder."""
    root = tmp_path / "data"
    for name in ("T91", "Set5", "Set14", "BSD68", "B100"):
        os.makedirs(root, exist_ok=True)
        os.symlink(tiny_cfg["eval_dir"] if name != "T91" else tiny_cfg["data_dir"], root / name)
    tiny = ["num_blocks=1", "channels=8", "patch_size=32", "batch_size=4", "val_every=2", "ckpt_every=2",
            "log_every=1"]
    ablation = [("ablate_a", ["lr=1e-3"]), ("ablate_b", ["lr=1e-3", "jitter=0"])]
    runs = [("baseline", [*tiny, "model=basic", "lr=1e-3", "max_steps=6"]),
            ("residual", [*tiny, "model=residual", "lr=1e-3", "max_steps=4"]),
            ("lr_1e-2", [*tiny, "model=basic", "lr=1e12", "max_steps=6"]),
            ("lr_1e-3", [*tiny, "model=basic", "lr=1e-3", "max_steps=6"]),
            ("gan", [*tiny, "model=residual", "gan=true", f"init={tiny_cfg['ckpt_dir']}/residual/model.pt", "lr=1e-3",
                     "max_steps=2"]),
            ("residual_matlab", [*tiny, "model=residual", "degradation=bicubic_matlab", "max_steps=2"]),
            ("final_t91", [*tiny, "model=residual", "degradation=bicubic_matlab", "ema=0.5", "max_steps=2"]),
            ("final_no_rescale", [*tiny, "model=residual", "degradation=bicubic_matlab", "ema=0.5",
                                  f"init={tiny_cfg['ckpt_dir']}/final_t91/model.pt", "max_steps=2"]),
            ("final", [*tiny, "model=residual", "degradation=bicubic_matlab", "ema=0.5", "scale_augment=0.5",
                       f"init={tiny_cfg['ckpt_dir']}/final_t91/model.pt", "max_steps=2"]),
            *[(name, [*tiny, "model=residual", *settings, "max_steps=2"]) for name, settings in ablation]]
    monkeypatch.setattr(report, "RUNS", runs)
    monkeypatch.setattr(report, "ABLATION", ablation)
    monkeypatch.setattr(report, "DATA_ROOT", str(root))
    monkeypatch.setattr(report, "CROPS", {name: ("Set5", "img00.png", 4, 4, 24) for name in report.CROPS})
    monkeypatch.setattr(report, "COMPARISON_SIDE", 16)
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
    for leftover in os.listdir(os.path.join(tiny_cfg["ckpt_dir"], "lr_1e-3")):  # logging, before its first checkpoint
        os.remove(os.path.join(tiny_cfg["ckpt_dir"], "lr_1e-3", leftover))
    return config.parse_overrides(where)


@pytest.mark.slow
def test_report_labels_unfinished_and_diverged_runs_and_rebuilds_the_same_bytes(tiny_experiments, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    blocks, values = report.build(tiny_experiments, str(first), torch.device("cpu"))
    report.build(tiny_experiments, str(second), torch.device("cpu"))
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second)) and len(names) == 21
    assert {"lr_image.png", "hr_image.png", "loader.png", "comparison.png", "compare"} <= set(names)
    for name in names:
        if name != "compare":  # the page: tests/test_pages.py
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "compare" / "index.html").read_bytes() == (second / "compare" / "index.html").read_bytes()
    runs = blocks["runs"]
    assert re.search(r"\| baseline \[in progress: step 4 of 6\] \| basic \| T91 \(4\) \| 4×32² \| 0\.001 \| 4 \|", runs)
    assert re.search(r"\| residual \| residual \| T91 \(4\) \| 4×32² \| 0\.001 \| 4 \|.*\| — \|\n", runs)  # no verdict: short
    assert re.search(r"\| lr_1e-2 \[diverged at step \d; last finite checkpoint: none\] \|", runs)
    assert re.search(r"\| lr_1e-3 \[in progress: no checkpoint yet\] \| basic \| T91 \(4\) \| 4×32² \| 0\.001 \| — \|", runs)
    assert "| gan | residual from residual/model.pt |" in runs and "| final | residual from final_t91/model.pt |" in runs
    assert "| baseline [in progress: step 4 of 6] |" in blocks["key-results"]
    assert re.search(r"\| bicubic upsampling \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ \|",
                     blocks["key-results"])
    standard = blocks["standard"]
    assert "| B100 |" in standard.split("\n")[0]
    assert "| VDSR (published) | single model | 665k | T91 + BSD200 (291) | 37.53 / 0.9587 | 33.03 / 0.9124 | 31.90 / 0.8960 |" in standard
    assert re.search(r"\| final \| x8 self-ensemble \| 1k \| T91 \(4\) at 2 scales \| [\d.]+ / [\d.]+ \| [\d.]+ / [\d.]+ "
                     r"\| not run \|", standard)
    assert "| final, T91 only | single model |" in standard and "| residual_matlab | single model |" in standard
    assert "| final, no downscaled copies | single model | 1k | T91 (4) |" in standard
    assert "| final | single model | 1k | T91 (4) at 2 scales |" in standard
    assert re.search(r"\| ablate_a \| `lr=1e-3` \| [\d.]+\xa0±\xa0[\d.]+ \| [\d.]+ \| — \| [\d.]+ \| — \|", blocks["ablation"])
    assert re.search(r"\| ablate_b \| `jitter=0` \| [\d.]+\xa0±\xa0[\d.]+ \| [\d.]+ \| [+-]?[\d.]+\xa0±\xa0[\d.]+ \|",
                     blocks["ablation"])
    assert values["ablation_steps"] == "2" and values["recipe_lr"] == "5e-4"
    for name in ("final_vs_t91_B100", "final_vs_no_rescale_Set5", "no_rescale_vs_t91_B100", "final_x8_gain_Set14",
                 "t91_ema_gain_Set14", "ablation_total_B100"):
        assert re.fullmatch(r"[+-]?\d+\.\d\d\xa0±\xa0\d+\.\d\d", values[name]), name
    assert "| BSD68 | residual | " in blocks["downscaling"] and "LR by nearest centred" in blocks["downscaling"]
    assert "| residual, step 4 (GAN's start) |" in blocks["gan"] and "GMSD" in blocks["gan"]
    assert blocks["comparison"].startswith("![Figure 1") and blocks["loader"].startswith("![Figure 2")
    assert blocks["gan-crops"].startswith("![Figure 8") and blocks["final-crops"].startswith("![Figure 10")
    assert re.fullmatch(r"Set14/img\d\d\.png at \(\d+, \d+\) and B100/img\d\d\.png at \(\d+, \d+\)", values["comparison_crops"])
    assert values["gap_Set5"].count("±") == 1 and math.isfinite(float(values["gan_cost_Set14"]))
    assert math.isfinite(float(values["residual_loss_shift"])) and values["baseline_trend"] == "—"


def test_blocks_makes_only_those_again_and_keeps_the_rest_from_report_json(tiny_experiments, tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    saved = {"blocks": {"runs": "old runs\n", "standard": "old standard\n"}, "values": {"kept": "1.00"}}
    (out / "report.json").write_text(json.dumps(saved))
    published = {}
    monkeypatch.setattr(report, "publish", lambda out_dir, blocks, values: published.update(blocks=blocks, values=values))
    where = [f"runs_dir={tiny_experiments['runs_dir']}", f"ckpt_dir={tiny_experiments['ckpt_dir']}", "device=cpu",
             f"report_dir={out}"]
    with pytest.raises(SystemExit, match=r"report_blocks=runs,tables: no block 'tables'; blocks: compare, runs, standard$"):
        report.main([*where, "report_blocks=runs,tables"])
    report.main([*where, "report_blocks=runs"])
    assert published["blocks"]["standard"] == "old standard\n" and published["values"] == {"kept": "1.00"}
    assert published["blocks"]["runs"].startswith("| run |") and "| final_no_rescale |" in published["blocks"]["runs"]
    assert json.loads((out / "report.json").read_text()) == published
    assert sorted(os.listdir(out)) == ["report.json", "runs.md"]


def test_render_pdf_is_reproducible_and_holds_the_tables(tmp_path):
    pymupdf = pytest.importorskip("pymupdf")
    markdown = tmp_path / "r.md"
    markdown.write_text("# Title\n\n| method | PSNR (dB) |\n|---|---:|\n| bicubic upsampling | 30.79 |\n")
    first = report.render_pdf(str(markdown), str(tmp_path / "a.pdf"))
    second = report.render_pdf(str(markdown), str(tmp_path / "b.pdf"))
    assert open(first, "rb").read() == open(second, "rb").read()
    text = pymupdf.open(first)[0].get_text()
    assert "bicubic upsampling" in text and "30.79" in text


def committed_report():
    with open(os.path.join(REPO, "runs", "report", "report.json")) as f:
        return json.load(f)


def test_the_committed_report_is_the_template_filled_with_the_committed_blocks_and_values():
    saved = committed_report()
    with open(report.TEMPLATE) as f:
        filled = report.fill(f.read(), saved["blocks"], saved["values"])
    with open(os.path.join(REPO, "runs", "report", "report.md")) as f:
        assert f.read() == filled
    for name, body in saved["blocks"].items():
        table = os.path.join(REPO, "runs", "report", f"{name}.md")
        if body.startswith("!["):
            assert os.path.isfile(os.path.join(REPO, re.match(r"!\[[^]]*\]\(([^)]+)\)", body).group(1))), name
        else:
            assert open(table).read() == body, name
    with open(os.path.join(REPO, "README.md")) as f:
        readme = {m.group("name"): m.group(3) for m in report.MARKER.finditer(f.read())}
    assert readme == {"key-results": saved["blocks"]["key-results"], "standard": saved["blocks"]["standard"]}


def test_the_committed_pdf_has_at_most_10_pages_and_the_key_results_on_page_1():
    pymupdf = pytest.importorskip("pymupdf")
    pdf = pymupdf.open(os.path.join(REPO, "README.pdf"))
    assert pdf.page_count <= 10
    first_row = committed_report()["blocks"]["key-results"].split("\n")[2].split(" | ")[0].strip("| ")
    assert "Table 1" in pdf[0].get_text() and first_row in pdf[0].get_text()


def regenerate(tmp_path, only, monkeypatch):
    monkeypatch.setattr(report, "DATA_ROOT", os.path.dirname(shared_folder("Set5")))  # the local copy
    cfg = config.parse_overrides([f"runs_dir={REPO}/runs", f"ckpt_dir={REPO}/checkpoints"])
    cwd = os.getcwd()
    os.chdir(REPO)  # the runs' folders are relative to the repository root
    try:
        report.build(cfg, str(tmp_path), torch.device("cpu"), only=only)
    finally:
        os.chdir(cwd)
    return sorted(os.listdir(tmp_path))


def assert_same_as_committed(tmp_path, names):
    """Byte for byte; except that a figure of model outputs made on a CPU with other kernels (e.g. AVX2 instead of
    the AVX-512 that made the committed ones) may differ by one level in a few pixels (measured: at most 0.01%)."""
    import numpy as np
    from PIL import Image

    for name in names:
        if os.path.isdir(tmp_path / name):  # the comparison page: its index.html and images
            inside = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, files in os.walk(tmp_path / name)
                            for f in files)
            assert_same_as_committed(tmp_path, inside)
            continue
        committed = os.path.join(REPO, "runs", "report", name)
        made, kept = open(tmp_path / name, "rb").read(), open(committed, "rb").read()
        if made == kept or not name.endswith(".png"):
            assert made == kept, f"{name} differs from the committed one"
            continue
        made, kept = (np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in (tmp_path / name, committed))
        assert made.shape == kept.shape, f"{name}: {made.shape} instead of {kept.shape}"
        differing = np.abs(made - kept).max(axis=-1)
        assert differing.max() <= 1 and (differing > 0).mean() < 1e-3, \
            f"{name} differs from the committed one: {(differing > 0).mean():.4%} of the pixels, by up to {differing.max()}"


def test_committed_plots_and_tables_are_reproduced_from_the_committed_checkpoints_and_logs(tmp_path, monkeypatch):
    names = regenerate(tmp_path, {"runs", "curves", "lr-sweep", "sweep", "loader"}, monkeypatch)
    assert names == ["curves.png", "hr_image.png", "loader.png", "lr-sweep.png", "lr_image.png", "runs.md", "sweep.md"]
    assert_same_as_committed(tmp_path, names)


@pytest.mark.manual
def test_the_whole_committed_report_is_reproduced(tmp_path, monkeypatch):
    shared_folder("BSD68")
    names = regenerate(tmp_path, None, monkeypatch)
    assert names == sorted(set(os.listdir(os.path.join(REPO, "runs", "report"))) - {"report.json", "report.md"})
    assert_same_as_committed(tmp_path, names)


def test_report_needs_the_standard_sets_and_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"nowhere/T91: no such folder; the report evaluates on the standard sets"):
        report.main([])


def test_make_pdf_without_a_report_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"report\.json: no such file; run `make report` first"):
        report.main(["pdf"])
