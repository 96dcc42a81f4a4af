import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

import config
import report
import train
from conftest import shared_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    for name in ("T91", "Set5", "Set14", "B100"):
        os.makedirs(root, exist_ok=True)
        os.symlink(tiny_cfg["eval_dir"] if name != "T91" else tiny_cfg["data_dir"], root / name)
    tiny = ["num_blocks=1", "channels=8", "patch_size=32", "batch_size=4", "val_every=2", "ckpt_every=2",
            "log_every=1"]
    ablation = [("ablate_a", ["lr=1e-3"]), ("ablate_b", ["lr=1e-3", "jitter=0"])]
    runs = [("baseline", [*tiny, "model=basic", "lr=1e-3", "max_steps=6"]),
            ("residual", [*tiny, "model=residual", "lr=1e-3", "max_steps=4"]),
            ("lr_1e-2", [*tiny, "model=basic", "lr=1e12", "max_steps=6"]),
            *[(name, [*tiny, "model=basic", f"lr={name[3:]}", "max_steps=6"]) for name in ("lr_1e-3", "lr_1e-5")],
            ("lr_1e-4", [*tiny, "model=basic", "lr=1e-3", "max_steps=2"]),  # the tiny baseline's settings, rerun
            ("lr_1e-6", [*tiny, "model=basic", "lr=1e-6", "max_steps=2"]),
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
    monkeypatch.setattr(report, "TEXTURED", ("Set14", "img00.png"))
    monkeypatch.setattr(report, "TYPICAL_SIDE", 24)
    monkeypatch.setattr(report, "BEST_SIDE", 16)
    monkeypatch.setattr(report, "SWEEP", 2)  # the sweep's steps: lr_1e-3 (6 planned) is a rate trained on
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
    first, second, readme = tmp_path / "first", tmp_path / "second", tmp_path / "README.md"
    readme.write_text("intro\n<!-- report:key-results -->\nold\n<!-- /report:key-results -->\nend\n")
    for out in (first, second):
        out.mkdir()
        tables, values = report.build(tiny_experiments, str(out), torch.device("cpu"))
        report.publish(str(out), tables, values, str(out / "README.pdf"), str(readme))
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second))
    assert {"lr_image.png", "hr_image.png", "loader.png", "typical.png", "split.png", "values.json",
            "key_results.json", "runs.json", "README.pdf", "scores.json", "report.typ"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    rows = {row[0]: row for row in tables["runs"]["rows"]}
    assert rows["baseline [in progress: step 4 of 6]"][1:7] == ["basic", "T91 (4)", "4×32²", "1e-3", "4", "0k"]
    assert rows["residual"][-1] == "—"  # no trend verdict: too short
    assert any(re.fullmatch(r"lr_1e-2 \[diverged at step \d; last finite checkpoint: none\]", name) for name in rows)
    assert rows["lr_1e-3 [in progress: no checkpoint yet]"][5] == "—"
    assert rows["gan"][1] == "residual from residual" and rows["final"][1] == "residual from final_t91"
    key = {row[0]: row for row in tables["key_results"]["rows"]}
    assert tables["key_results"]["header"][1:] == ["Set5 (validation)", "Set14 (test)", "B100 (test)"]
    assert "baseline [in progress: step 4 of 6]" in key and re.fullmatch(r"[\d.]+ / [\d.]+", key["bicubic upsampling"][3])
    assert readme.read_text().startswith("intro\n<!-- report:key-results -->\n| method | Set5 (validation) |")
    standard = {row[0]: row for row in tables["standard"]["rows"]}
    assert standard["VDSR (published)"] == ["VDSR (published)", "665k", "T91 + BSD200 (291)", "37.53 / 0.9587",
                                            "33.03 / 0.9124", "31.90 / 0.8960"]
    assert standard["final, x8"][2] == "T91 (4) at 2 scales" and standard["final, x8"][-1] == "not run"
    assert standard["final, no downscaled copies"][1:3] == ["1k", "T91 (4)"]
    ablation = tables["ablation"]["rows"]
    assert ablation[0][1:2] == ["lr=1e-3"] and ablation[0][4] == "—" and ablation[1][1] == "jitter=0"
    assert values["ablation_steps"] == "2" and values["recipe_lr"] == "5e-4"
    for name in ("final_vs_t91_B100", "final_vs_no_rescale_Set5", "final_x8_gain_Set14", "t91_ema_gain_Set14",
                 "ablation_total_B100", "gap_level"):
        assert re.fullmatch(r"[+\u2212]?\d+\.\d\d\xa0±\xa0\d+\.\d{2,}", values[name]), name
    assert [row[:2] for row in tables["downscaling"]["rows"][:3]] == [["Set5", "bicubic upsampling"],
                                                                      ["Set5", "baseline [in progress: step 4 of 6]"], ["Set5", "residual"]]
    assert re.fullmatch(r"\d+\.\d–\d+\.\d|\d+\.\d|[\d.\u2212]+ to [\d.\u2212]+", values["baseline_loss_nearest_last"])
    assert tables["downscaling"]["header"][2:] == ["bilinear (training)", "bicubic", "nearest, top-left",
                                                   "nearest, bottom-right", "2×2 mean"]
    assert tables["gan"]["rows"][1][0] == "residual, step 4 (GAN's start)"
    assert re.fullmatch(r"img\d\d\.png", values["typical"]) and values["baseline_trend"] == "—"
    sweep = tables["sweep"]["rows"]  # lr, level to step SWEEP, range, L1, last 5 validations of a longer run, Δ vs 1e-4, note
    trained_on, baseline = (next(row for row in sweep if row[6] == note) for note in ("in progress: no checkpoint yet", "the baseline"))
    assert re.fullmatch(r"\d+\.\d\d\xa0±\xa0\d+\.\d{2,} \(2–6\)", trained_on[4])  # lr_1e-3: 6 steps planned, SWEEP 2
    assert re.fullmatch(r"[\d.]+\xa0±\xa0[\d.]+ \(2–4\)", baseline[4])
    assert [row[4] for row in sweep if row[0] == "1e-6"] == ["—"]  # 2 steps: not trained on
    assert next(row for row in sweep if row[0] == "1e-5")[5] == values["lr_1e_5_vs_baseline"] != "—"  # 6 steps, like 1e-3
    assert [row[3:6] for row in sweep if row[6].startswith("diverged")] == [["not finite", "—", "—"]]
    assert re.fullmatch(r"[+\u2212]?\d+\.\d\d\xa0±\xa0\d+\.\d{2,}", values["lr_1e_3_vs_baseline"])
    assert trained_on[5] == values["lr_1e_3_vs_baseline"] and baseline[5] == "—"
    assert re.fullmatch(r"\d+\.\d\d\xa0±\xa0\d+\.\d{2,}", values["lr_1e_4_level"])
    assert re.fullmatch(r"\d\.\d{4} to \d\.\d{4}", values["gan_l1_ends"]) and re.fullmatch(r"[\d.]+ to [\d.]+", values["gan_d_loss_ends"])
    assert all(math.isfinite(float(values[name].replace("\u2212", "-"))) for name in ("gan_cost_Set14", "residual_loss_box"))


def test_scores_are_computed_once_and_kept_by_what_they_depend_on(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setattr(report, "DATA_ROOT", os.path.dirname(tiny_data["eval"]))
    set_name, calls = os.path.basename(tiny_data["eval"]), []

    def upscale(low_res):
        calls.append(1)
        return report.metrics.interpolate(low_res, 2, "bicubic")

    method, path = report.Method("bicubic", "k1", upscale), str(tmp_path / "scores.json")
    first = report.Scores(path, torch.device("cpu")).rgb(method, set_name)
    assert calls and report.Scores(path, torch.device("cpu")).rgb(method, set_name) == first  # read back, not run
    count = len(calls)
    report.Scores(path, torch.device("cpu")).rgb(method, set_name, "nearest")  # another degradation: computed
    report.Scores(path, torch.device("cpu")).rgb(method._replace(key="k2"), set_name)  # another checkpoint: computed
    assert len(calls) == 3 * count
    assert first == report.metrics.evaluate(upscale, report.SRDataset(tiny_data["eval"], train=False), torch.device("cpu"))


def test_a_run_the_report_needs_is_named_with_the_command_that_trains_it(tiny_cfg, tmp_path):
    cfg = config.parse_overrides([f"runs_dir={tmp_path}", f"ckpt_dir={tmp_path}", "device=cpu"])
    with pytest.raises(SystemExit, match=r"the report needs run 'baseline', which has no checkpoint in .*: "
                                         r"python code/experiments.py baseline$"):
        report.build(cfg, str(tmp_path / "out"), torch.device("cpu"))


def committed(name):
    return os.path.join(REPO, "runs", "report", name)


def test_every_value_table_and_figure_the_text_names_is_one_the_code_wrote_and_none_is_left_unused():
    with open(report.TEMPLATE) as f:
        text = f.read()
    with open(committed("values.json")) as f:
        values = json.load(f)
    assert set(re.findall(r"(?<![\w.])v\.(\w+)", text)) == set(values)
    assert {f"{name}.json" for name in re.findall(r'tab\("(\w+)"', text)} | {"values.json"} == \
        {n for n in os.listdir(committed("")) if n.endswith(".json")} - {"scores.json"}
    assert {f"{name}.png" for name in re.findall(r'pic\("(\w+)"', text)} | {"lr_image.png", "hr_image.png"} == \
        {n for n in os.listdir(committed("")) if n.endswith(".png")}
    with open(os.path.join(REPO, "README.md")) as f:
        readme = {m.group("name"): m.group(3) for m in report.MARKER.finditer(f.read())}
    for name, table in (("key-results", "key_results"), ("standard", "standard")):
        with open(committed(f"{table}.json")) as f:
            assert readme[name] == report.markdown(json.load(f)), name


def test_the_committed_pdf_is_typst_setting_the_committed_text_tables_and_figures(tmp_path):
    out = tmp_path / "report"
    shutil.copytree(committed(""), out, ignore=shutil.ignore_patterns("scores.json", "compare"))
    assert open(report.render_pdf(str(out), str(tmp_path / "README.pdf")), "rb").read() == \
        open(os.path.join(REPO, "README.pdf"), "rb").read()


def test_a_value_the_text_quotes_that_the_code_did_not_write_is_one_line(tmp_path):
    (tmp_path / "values.json").write_text("{}")
    with pytest.raises(SystemExit, match=r'report.typ: dictionary does not contain key "parameters"$'):
        report.render_pdf(str(tmp_path), str(tmp_path / "README.pdf"))


def test_the_committed_pdf_has_at_most_10_pages_and_the_key_results_on_page_1():
    import pymupdf  # pinned in requirements.txt: a broken install fails here, not skipped
    pdf = pymupdf.open(os.path.join(REPO, "README.pdf"))
    assert pdf.page_count <= 10
    with open(committed("key_results.json")) as f:
        rows = json.load(f)["rows"]
    page = pdf[0].get_text().replace("\xa0", " ")
    assert "Table 1" in page and all(row[0] in page and row[3] in page for row in rows)


def training_now(run, ckpt_dir=os.path.join(REPO, "checkpoints")):
    """Whether train.py is training `run` in this checkout now (it holds the run's lock): its logs and checkpoints move."""
    path = train.lock_path({"ckpt_dir": ckpt_dir, "run": run})
    if not os.path.isfile(path):
        return False
    with open(path) as lock:
        try:
            fcntl.lockf(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
    return False


def test_a_run_counts_as_training_while_another_process_holds_its_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import time, train; lock = train.lock_run({{'ckpt_dir': {str(tmp_path)!r}, "
                               "'run': 'r'}); print('held', flush=True); time.sleep(60)"], cwd=os.path.join(REPO, "code"),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert training_now("r", str(tmp_path)) and not training_now("other", str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not training_now("r", str(tmp_path))  # the lock file stays; the kernel's lock went with its process


def regenerate(tmp_path, monkeypatch):
    """The report's context on the committed runs, writing into tmp_path; skipped while one of them trains here (the
    long sweep runs in the background for hours), as its files are no longer the committed ones."""
    training = [name for name, _ in report.RUNS if training_now(name)]
    if training:
        pytest.skip(f"run {training[0]} is training in this checkout: its logs and checkpoints are moving")
    monkeypatch.setattr(report, "DATA_ROOT", os.path.dirname(shared_folder("Set5")))  # the local copy
    for name in report.SETS + ("T91",):
        shared_folder(name)
    monkeypatch.chdir(REPO)  # the runs' folders are relative to the repository root
    cfg = config.parse_overrides([f"runs_dir={REPO}/runs", f"ckpt_dir={REPO}/checkpoints"])
    return cfg


def assert_same_as_committed(tmp_path, names):
    """Byte for byte; except that a figure of model outputs made on a CPU with other kernels (e.g. AVX2 instead of
    AVX-512) may differ by one level in a few pixels (measured: at most 0.01%)."""
    import numpy as np
    from PIL import Image

    for name in names:
        made, kept = open(tmp_path / name, "rb").read(), open(committed(name), "rb").read()
        if made == kept or not name.endswith(".png"):
            assert made == kept, f"{name} differs from the committed one"
            continue
        made, kept = (np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in (tmp_path / name, committed(name)))
        assert made.shape == kept.shape, f"{name}: {made.shape} instead of {kept.shape}"
        differing = np.abs(made - kept).max(axis=-1)
        assert differing.max() <= 1 and (differing > 0).mean() < 1e-3, \
            f"{name} differs from the committed one: {(differing > 0).mean():.4%} of the pixels, by up to {differing.max()}"


def test_committed_sweep_loader_and_runs_are_reproduced_from_the_committed_checkpoints_and_logs(tmp_path, monkeypatch):
    r = report.context(regenerate(tmp_path, monkeypatch), str(tmp_path), torch.device("cpu"))
    report.learning_rates(r)
    report.loader_figure(r.fig("loader"), str(tmp_path))
    r.tables["runs"] = report.runs_table(list(r.runs.values()))
    for name, table in r.tables.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    names = sorted(n for n in os.listdir(tmp_path) if n != "scores.json")
    assert names == ["comic.png", "hr_image.png", "loader.png", "lr_image.png", "lr_sweep.png", "runs.json",
                     "sweep.json"]
    assert_same_as_committed(tmp_path, names)


@pytest.mark.manual
def test_the_whole_committed_report_is_reproduced(tmp_path, monkeypatch):
    tables, values = report.build(regenerate(tmp_path, monkeypatch), str(tmp_path), torch.device("cpu"))
    readme = tmp_path / "README.md"
    shutil.copyfile(os.path.join(REPO, "README.md"), readme)
    report.publish(str(tmp_path), tables, values, str(tmp_path / "README.pdf"), str(readme))
    assert readme.read_text() == open(os.path.join(REPO, "README.md")).read()
    names = sorted(set(os.listdir(tmp_path)) - {"scores.json", "report.typ", "README.md", "README.pdf"})
    assert names == sorted(set(os.listdir(committed(""))) - {"compare", "scores.json", "report.typ"})
    assert_same_as_committed(tmp_path, names)


def test_report_needs_the_standard_sets_and_says_so_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(report, "DATA_ROOT", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"nowhere/T91: no such folder; the report evaluates on the standard sets"):
        report.main([])


def test_training_data_counts_the_standard_sets_where_this_machine_has_them(tmp_path, monkeypatch):
    for name, count in (("T91", 3), ("BSD200", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.png").write_bytes(b"")
        (tmp_path / name / "README.md").write_text("not an image")
    monkeypatch.setattr(report, "DATA_ROOT", str(tmp_path))
    # the committed runs name the folders they were trained from on our machines, absent on a user's
    cfg = {"data_dir": "../elsewhere/T91,../elsewhere/BSD200", "scale_augment": "0.9,0.8"}
    assert report.training_data(cfg) == "T91 + BSD200 (5) at 3 scales"
    assert report.training_data({"data_dir": "/x/Set5", "scale_augment": ""}) == "Set5 (0)"


def test_a_runs_hardware_is_shortened_to_the_processor_and_precision():
    def hardware(summary, payload):
        return report.Run.hardware(types.SimpleNamespace(summary=summary, payload=payload))

    assert hardware({"hardware": "Intel(R) Xeon(R) Processor, 2 threads, bf16 autocast"}, {}) == "Xeon, bf16"
    assert hardware({}, {"hardware": "AMD EPYC Processor, 2 threads, fp32"}) == "AMD EPYC, fp32"  # unfinished: its checkpoint's
    assert hardware({}, {}) == "—"
