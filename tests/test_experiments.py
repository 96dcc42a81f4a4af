import os

import pytest

import experiments


def test_runs_share_settings_and_names_are_unique():
    names = [name for name, _ in experiments.RUNS]
    assert len(names) == len(set(names)) and {"baseline", "residual"} <= set(names)
    lrs = sorted(float(dict(a.split("=") for a in s)["lr"]) for n, s in experiments.RUNS if n.startswith("lr_"))
    assert lrs == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    settings = dict(experiments.RUNS)  # lr_1e-4: the baseline's settings, stopped at step 5,000
    assert [a for a in settings["lr_1e-4"] if a != "max_steps=5000"] == [a for a in settings["baseline"] if "max_steps" not in a]
    steps = {n: dict(a.split("=") for a in s)["max_steps"] for n, s in experiments.RUNS}
    assert steps["baseline"] == steps["residual"]


@pytest.mark.slow
def test_runner_trains_missing_runs_skips_finished_ones_and_goes_on_after_a_divergence(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(experiments, "COMMON", [f"data_dir={tiny_cfg['data_dir']}", f"eval_dir={tiny_cfg['eval_dir']}",
                                                "val_every=2", "ckpt_every=2"])
    tiny = ["num_blocks=1", "channels=8", "patch_size=32", "batch_size=4", "max_steps=2"]
    monkeypatch.setattr(experiments, "RUNS", [("blowup", [*tiny, "lr=1e12", "max_steps=50"]), ("ok", tiny)])
    where = [f"runs_dir={tiny_cfg['runs_dir']}", f"ckpt_dir={tiny_cfg['ckpt_dir']}", "num_workers=0"]
    assert experiments.main(where) == [("blowup", "diverged (exit 3)"), ("ok", "trained")]
    assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], "ok", "model.pt"))
    assert experiments.main([*where, "ok"]) == [("ok", "done before")]


def test_the_exit_status_stops_make_after_an_interrupted_run_and_reports_a_failed_one():
    assert experiments.exit_status([("a", "trained"), ("b", "diverged (exit 3)"), ("c", "done before")]) == 0
    assert experiments.exit_status([("a", "trained"), ("b", "exit 75")]) == 75  # an interrupted run (75) fails make: nothing after it runs
    assert experiments.exit_status([("a", "exit 1"), ("b", "trained")]) == 1


def test_the_gan_trials_run_only_when_named(monkeypatch):
    monkeypatch.setattr(experiments, "finished_step", lambda *args: 1)  # every run done: nothing trains
    assert [name for name, _ in experiments.main([])] == [name for name, _ in experiments.RUNS]
    assert not any(name.startswith("gan2_") for name, _ in experiments.RUNS) and len(experiments.TRIALS) == 6
    assert experiments.main(["gan2_sn_a0.1", "baseline"]) == [("baseline", "done before"), ("gan2_sn_a0.1", "done before")]


def test_unknown_run_names_and_keys_stop_before_work():
    with pytest.raises(SystemExit, match="unknown run 'baseline2'"):
        experiments.main(["baseline2"])
    with pytest.raises(SystemExit, match="unknown key 'speed'"):
        experiments.main(["speed=1"])


def test_every_file_a_run_starts_from_is_written_by_a_run_before_it():
    """`make experiments` in an empty checkpoints folder must be able to rebuild every run: each init= names the
    model.pt of an earlier run, or the model_<N>.pt that an earlier run keeps with save_model_at=N."""
    written = set()
    for name, settings in experiments.RUNS + experiments.TRIALS:
        cfg = experiments.config.parse_overrides([*experiments.COMMON, *settings])
        if cfg["init"]:
            assert os.path.normpath(cfg["init"]) in written, f"{name} starts from {cfg['init']}, which no run before writes"
        folder = os.path.join(cfg["ckpt_dir"], name)
        written.add(os.path.normpath(os.path.join(folder, "model.pt")))
        if cfg["save_model_at"]:
            written.add(os.path.normpath(os.path.join(folder, f"model_{cfg['save_model_at']:06d}.pt")))
    assert len([n for n, s in experiments.RUNS if any(a.startswith("init=") for a in s)]) >= 3  # gan, matlab, final
