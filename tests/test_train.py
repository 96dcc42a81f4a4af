import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import config
import train
from metrics import loss_function
from conftest import CODE
from plots import read_scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def state_dict_of(path):
    return torch.load(path, weights_only=True)["model"]


def final_weights(cfg, run):
    """The weights of run's model.pt in cfg's checkpoint folder."""
    return state_dict_of(os.path.join(cfg["ckpt_dir"], run, "model.pt"))


def test_short_training_writes_checkpoints_logs_and_lowers_the_loss(tiny_cfg):
    summary = train.train(tiny_cfg)
    run_dir = os.path.join(tiny_cfg["runs_dir"], "tiny")
    ckpt_dir = os.path.join(tiny_cfg["ckpt_dir"], "tiny")
    assert summary["steps"] == 20
    assert sorted(os.listdir(ckpt_dir)) == ["config.json", "model.pt", "model_best.pt", "step000010.pt",
                                            "step000020.pt"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    assert os.path.getsize(os.path.join(run_dir, "curves.png")) > 10_000
    assert json.load(open(os.path.join(run_dir, "config.json"))) == tiny_cfg
    scalars = read_scalars(run_dir)
    steps, losses = scalars["train/l1"]
    assert steps == list(range(1, 21))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert scalars["val/psnr"][0] == [10, 20] and set(scalars) >= {"val/l1", "val/psnr", "val/ssim"}
    assert summary["final_val"]["psnr"] == pytest.approx(scalars["val/psnr"][1][-1], abs=1e-4)


def test_an_l2_loss_and_a_loss_border_each_train_other_weights_and_log_every_step(tiny_cfg):
    train.train(dict(tiny_cfg, run="l1", max_steps=4))
    train.train(dict(tiny_cfg, run="l2_whole", max_steps=4, loss="l2"))
    train.train(dict(tiny_cfg, run="l2", max_steps=4, loss="l2", loss_border=4))
    l1, whole, l2 = (final_weights(tiny_cfg, run) for run in ("l1", "l2_whole", "l2"))
    assert not all(torch.equal(l1[k], whole[k]) for k in l1) and not all(torch.equal(whole[k], l2[k]) for k in l1)
    assert read_scalars(os.path.join(tiny_cfg["runs_dir"], "l2"))["train/l1"][0] == [1, 2, 3, 4]


def test_a_luma_loss_trains_other_weights(tiny_cfg):
    train.train(dict(tiny_cfg, run="rgb", max_steps=4, loss="l2"))
    train.train(dict(tiny_cfg, run="y", max_steps=4, loss="l2", loss_channels="y"))
    rgb, y = (final_weights(tiny_cfg, run) for run in ("rgb", "y"))
    assert not all(torch.equal(rgb[k], y[k]) for k in rgb)
    assert read_scalars(os.path.join(tiny_cfg["runs_dir"], "y"))["train/l1"][0] == [1, 2, 3, 4]


@pytest.mark.parametrize("kind, channels", [("l2", "rgb"), ("l1", "y"), ("l2", "y")])
def test_a_step_on_another_loss_returns_the_rgb_l1_of_the_pixels_in_the_loss(kind, channels):
    """What is logged stays the RGB L1 whatever the loss, so the curves of every run compare."""
    torch.manual_seed(0)
    model = train.build_model({"model": "residual", "num_blocks": 1, "channels": 8, "scale": 2})
    networks = types.SimpleNamespace(optimizer=torch.optim.Adam(model.parameters(), lr=1e-3))
    low_res, high_res = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        before = model(low_res)
    expected_l1 = F.l1_loss(before[..., 3:-3, 3:-3], high_res[..., 3:-3, 3:-3])
    assert not torch.isclose(expected_l1, loss_function(before, high_res, kind, 3, channels=channels))
    logged = train.training_step(model, networks, low_res, high_res, torch.autocast("cpu", enabled=False), kind, 3,
                                 channels)
    assert set(logged) == {"l1"} and torch.allclose(logged["l1"], expected_l1)


def test_training_is_bit_identical_on_rerun(tiny_cfg, tmp_path):
    train.train(dict(tiny_cfg, max_steps=6))
    first = final_weights(tiny_cfg, "tiny")
    train.train(dict(tiny_cfg, max_steps=6, overwrite=True))
    second = final_weights(tiny_cfg, "tiny")
    assert all(torch.equal(first[k], second[k]) for k in first)


def resumed_at(capsys, run, step):
    """Whether the last train() said it resumed `run` at `step` (a run started over would end alike)."""
    return f"Resuming run '{run}' at step {step} from " in "".join(capsys.readouterr())


def test_resumed_training_matches_an_uninterrupted_one(tiny_cfg, capsys):
    train.train(dict(tiny_cfg, run="straight", max_steps=12))
    train.train(dict(tiny_cfg, run="resumed", max_steps=6, ckpt_every=3, num_workers=2))
    capsys.readouterr()
    train.train(dict(tiny_cfg, run="resumed", max_steps=12, resume="auto"))
    assert resumed_at(capsys, "resumed", 6)
    straight = final_weights(tiny_cfg, "straight")
    resumed = final_weights(tiny_cfg, "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps, _ = read_scalars(os.path.join(tiny_cfg["runs_dir"], "resumed"))["train/l1"]
    assert steps == list(range(1, 13))


def test_resume_with_other_settings_is_refused(tiny_cfg):
    train.train(dict(tiny_cfg, max_steps=2))
    with pytest.raises(SystemExit, match=r"other settings: lr=0.001 \(now 0.01\); to start run .* over with the new ones: overwrite=true"):
        train.train(dict(tiny_cfg, max_steps=4, lr=1e-2, resume="auto"))


def test_a_run_resumes_after_its_data_folder_moved_but_not_with_other_data(tiny_cfg, tmp_path, capsys):
    """data_dir is compared by its folders' names: ../shared/data/T91 -> data/T91 continues, T91 -> Set5 does not."""
    train.train(dict(tiny_cfg, max_steps=2, ckpt_every=2))
    moved = shutil.copytree(tiny_cfg["data_dir"], tmp_path / "elsewhere" / os.path.basename(tiny_cfg["data_dir"]))
    capsys.readouterr()
    train.train(dict(tiny_cfg, data_dir=str(moved), max_steps=4, resume="auto"))
    assert resumed_at(capsys, "tiny", 2)
    assert torch.load(os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt"), weights_only=True)["step"] == 4
    other = shutil.copytree(tiny_cfg["data_dir"], tmp_path / "other_set")
    with pytest.raises(SystemExit, match=r"other settings: data_dir=.*train \(now .*other_set\)"):
        train.train(dict(tiny_cfg, data_dir=str(other), max_steps=6, resume="auto"))


def test_an_existing_run_is_not_overwritten_unless_asked(tiny_cfg):
    train.train(dict(tiny_cfg, max_steps=2))
    model_path = os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt")
    before = open(model_path, "rb").read()
    with pytest.raises(SystemExit, match="already has .*pass resume=auto"):
        train.train(dict(tiny_cfg, max_steps=2))
    assert open(model_path, "rb").read() == before


def poison_samples_with_nan(monkeypatch):
    """Every training sample all NaN (the DataLoader path): the loss is NaN at step 1."""
    original = train.SRDataset.__getitem__
    monkeypatch.setattr(train.SRDataset, "__getitem__",
                        lambda self, index: tuple(t * float("nan") for t in original(self, index)))


def test_divergence_stops_cleanly_with_the_step(tiny_cfg, monkeypatch, capsys):
    """A NaN in the data poisons the loss at once, as a diverging learning rate does a few steps later."""
    poison_samples_with_nan(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        train.train(dict(tiny_cfg, max_steps=5, data_on_device="off"))  # the DataLoader path uses __getitem__
    assert exit_.value.code == checkpoints.EXIT_DIVERGED
    assert "training loss is nan at step 1 (diverged)" in capsys.readouterr().err


def test_save_model_at_keeps_that_steps_validated_model(tiny_cfg):
    """experiments.py's fine-tunes start from checkpoints/residual/model_020000.pt: the run itself writes it."""
    train.train(dict(tiny_cfg, max_steps=9, val_every=5, ckpt_every=2, save_model_at=4))
    kept = checkpoints.load_checkpoint(os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model_000004.pt"))
    final = checkpoints.load_checkpoint(os.path.join(tiny_cfg["ckpt_dir"], "tiny", "model.pt"))
    assert kept["step"] == 4 and set(kept["val"]) == set(final["val"])  # validated at step 4, off the val_every grid
    assert not all(torch.equal(kept["model"][k], final["model"][k]) for k in final["model"])
    events = EventAccumulator(os.path.join(tiny_cfg["runs_dir"], "tiny"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/psnr")] == [4, 5, 9]
    with pytest.raises(SystemExit, match="save_model_at=10: after max_steps=9, never reached"):
        train.train(dict(tiny_cfg, run="late", max_steps=9, save_model_at=10))


@pytest.mark.parametrize("ending", ["finished", "diverged"])
def test_training_leaves_no_data_workers_behind(tiny_cfg, monkeypatch, ending):
    """The workers ignore stop signals, so a worker left alive would make the process hang at exit; train() stops
    them whichever way it ends, although plotting and errors keep tracebacks that hold its frame."""
    import multiprocessing

    cfg = dict(tiny_cfg, max_steps=4, val_every=4, num_workers=2)
    if ending == "diverged":
        poison_samples_with_nan(monkeypatch)
        with pytest.raises(SystemExit):
            train.train(cfg)
    else:
        train.train(cfg)
    assert multiprocessing.active_children() == []


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


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_cfg, capsys):
    train.train(dict(tiny_cfg, run="straight", max_steps=15, ckpt_every=5))
    train.train(dict(tiny_cfg, run="broken", max_steps=10, ckpt_every=5))
    latest = os.path.join(tiny_cfg["ckpt_dir"], "broken", "step000010.pt")
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    train.train(dict(tiny_cfg, run="broken", max_steps=15, ckpt_every=5, resume="auto"))
    output = capsys.readouterr()
    assert f"warning: {latest}: not a readable checkpoint" in output.err
    assert "Resuming run 'broken' at step 5" in output.out
    straight = final_weights(tiny_cfg, "straight")
    resumed = final_weights(tiny_cfg, "broken")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_resume_auto_without_a_checkpoint_starts_fresh_but_never_over_leftovers(tiny_cfg):
    summary = train.train(dict(tiny_cfg, max_steps=3, resume="auto"))
    assert summary["steps"] == 3
    for path in checkpoints.step_checkpoints(os.path.join(tiny_cfg["ckpt_dir"], "tiny")):
        os.remove(path)
    with pytest.raises(SystemExit, match="no checkpoint to resume from; choose another run=name, or overwrite=true deletes"):
        train.train(dict(tiny_cfg, max_steps=3, resume="auto"))


def cli_args(cfg, **changes):
    keys = ("data_dir", "eval_dir", "runs_dir", "ckpt_dir", "run", "num_blocks", "channels", "patch_size",
            "batch_size", "num_workers", "log_every", "val_every", "ckpt_every", "lr", "max_steps", "amp")
    cfg = dict(cfg, **changes)
    return [sys.executable, os.path.join(CODE, "train.py"), *(f"{k}={cfg[k]}" for k in keys)]


@pytest.mark.slow
def test_a_second_process_for_the_same_run_stops_at_once_naming_the_holder(tiny_cfg):
    """Two real processes: one holds the run (as a training does), the second training of that run refuses in one
    line and writes nothing; once the holder is killed (-9, no clean-up), the run starts: the lock went with it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train; lock = train.lock_run("
                               f"{{'ckpt_dir': {tiny_cfg['ckpt_dir']!r}, 'run': 'twice'}}); print('held', flush=True); "
                               "time.sleep(600)"], cwd=CODE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run(cli_args(tiny_cfg, run="twice", max_steps=2), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        assert second.stderr.strip().count("\n") == 0, second.stderr
        assert "run 'twice' is already training" in second.stderr and f"pid {holder.pid}, since " in second.stderr
        assert not os.path.exists(os.path.join(tiny_cfg["ckpt_dir"], "twice"))
        assert not os.path.exists(os.path.join(tiny_cfg["runs_dir"], "twice"))
    finally:
        holder.kill()
        holder.wait()
    after = subprocess.run(cli_args(tiny_cfg, run="twice", max_steps=2, val_every=2), capture_output=True, text=True,
                           timeout=300)
    assert after.returncode == 0, after.stderr
    assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], "twice", "model.pt"))


def test_the_resume_state_is_written_before_the_best_model(tiny_cfg, monkeypatch):
    """A disk that fills while model_best.pt is written costs that copy, not the run: the step checkpoint of the
    same step is already on disk, so resume=auto continues from it."""
    written, real_save = [], train.save_checkpoint

    def recording_save(path, *args, **kwargs):
        written.append(os.path.basename(path))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    train.train(dict(tiny_cfg, max_steps=10, val_every=5, ckpt_every=5))
    assert written.index("step000005.pt") < written.index("model_best.pt")


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical_to_an_uninterrupted_run(tiny_cfg):
    """The process is killed without warning at whatever step it has reached after its step-20 checkpoint."""
    cfg = dict(tiny_cfg, channels=32, num_blocks=3, patch_size=64, max_steps=40, ckpt_every=5, val_every=20,
               num_workers=1)
    killed = subprocess.Popen(cli_args(cfg, run="killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(cfg["ckpt_dir"], "killed", "step000020.pt")
    deadline = time.time() + 120
    while not os.path.exists(marker) and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.kill()
    killed.wait()
    assert os.path.exists(marker) and killed.returncode == -9
    # TensorBoard orders event files by the second in their names; a real restart comes later than this one
    time.sleep(1.1)
    train.train(dict(cfg, run="killed", resume="auto"))
    train.train(dict(cfg, run="straight"))
    straight = final_weights(cfg, "straight")
    resumed = final_weights(cfg, "killed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    events = EventAccumulator(os.path.join(cfg["runs_dir"], "killed"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/l1")] == list(range(1, 41))  # none missing, none twice


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_scheduler_signals_save_a_checkpoint_and_exit_75(tiny_cfg, signum):
    cfg = dict(tiny_cfg, channels=32, num_blocks=3, patch_size=64, max_steps=100000, ckpt_every=100000,
               val_every=5, num_workers=2)
    process = subprocess.Popen(cli_args(cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until training is under way
        if line.startswith("step 5:"):
            break
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == train.EXIT_INTERRUPTED, err
    name = signal.Signals(signum).name
    message = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(message) == 1 and message[0].startswith(f"stopped by {name} at step ")
    step = int(message[0].split(" at step ")[1].split(";")[0])
    saved = checkpoints.step_checkpoints(os.path.join(cfg["ckpt_dir"], "tiny"))
    assert [os.path.basename(p) for p in saved] == [f"step{step:06d}.pt"]
    summary = train.train(dict(cfg, max_steps=step + 2, resume="auto"))
    assert summary["steps"] == step + 2


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line_and_resume_auto_continues(tiny_cfg, capsys):
    """Two real SIGINTs to a training process whose steps after the 10th never end (as a large model's long step
    would, for the test's purpose), so that the first cannot end the run by itself: the second, sent once the first
    is acknowledged, stops it at once with one line naming the checkpoint that resume=auto continues from."""
    cfg = dict(tiny_cfg, max_steps=1000, val_every=5, ckpt_every=5)
    script = ("import time, train\n"
              "real_step, steps = train.training_step, []\n"
              "def endless_after_10(*args, **kwargs):\n"
              "    steps.append(None)\n"
              "    while len(steps) > 10:\n"
              "        time.sleep(1)\n"
              "    return real_step(*args, **kwargs)\n"
              "train.training_step = endless_after_10\n"
              f"train.train({cfg!r})\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=CODE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, process.kill)  # a hang fails the asserts below instead of blocking the suite
    watchdog.start()
    try:
        for line in process.stdout:  # validated at step 10, its checkpoint follows
            if line.startswith("step 10:"):
                break
        os.kill(process.pid, signal.SIGINT)
        err = []
        for line in process.stderr:  # wait until the first is handled: two at once would count as one
            err.append(line)
            if line.startswith("Ctrl-C:"):
                break
        os.kill(process.pid, signal.SIGINT)
        _, rest = process.communicate()
    finally:
        watchdog.cancel()
    err = "".join(err) + rest
    assert process.returncode == train.EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    stopped = [line for line in err.splitlines() if line.startswith("stopped")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped at once by a second Ctrl-C after step "), err
    ckpt_dir = os.path.join(cfg["ckpt_dir"], "tiny")
    newest = checkpoints.step_checkpoints(ckpt_dir)[0]
    assert stopped[0].endswith(f"; resume=auto continues from {newest}")
    assert not [name for name in os.listdir(ckpt_dir) if ".tmp" in name]  # nothing half-written
    step = torch.load(newest, weights_only=True)["step"]
    capsys.readouterr()
    summary = train.train(dict(cfg, max_steps=step + 2, resume="auto"))
    assert f"Resuming run 'tiny' at step {step} from {newest}" in capsys.readouterr().out
    assert summary["steps"] == step + 2


def test_ctrl_c_twice_during_the_final_save_is_one_line_and_resume_auto_finishes_the_run(tiny_cfg, capsys, monkeypatch):
    """The signals stay handled to the end of the run: two Ctrl-C while the final model's curves are drawn end it
    with one line (no traceback), and resume=auto finishes the final save."""
    real_plot = train.plot_training_curves
    def interrupted_plot(*args):
        signal.raise_signal(signal.SIGINT)  # the first: a flag; the second: stop at once
        signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(train, "plot_training_curves", interrupted_plot)
    cfg = dict(tiny_cfg, max_steps=4, ckpt_every=2)
    with pytest.raises(SystemExit) as exit_:
        train.train(cfg)
    assert exit_.value.code == train.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("stopped at once by a second Ctrl-C after step 4; ")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back
    monkeypatch.setattr(train, "plot_training_curves", real_plot)
    assert train.train(dict(cfg, resume="auto"))["steps"] == 4


def test_a_too_high_learning_rate_diverges_cleanly(tiny_cfg, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.train(dict(tiny_cfg, lr=1e12, max_steps=200, ckpt_every=1))  # step 1 finite, then not
    assert exit_.value.code == checkpoints.EXIT_DIVERGED
    message = capsys.readouterr().err.strip().splitlines()[-1]
    saved = checkpoints.step_checkpoints(os.path.join(tiny_cfg["ckpt_dir"], "tiny"))
    assert saved and "(diverged); lower lr=1000000000000.0. Last good checkpoint:" in message and saved[0] in message
    steps, values = read_scalars(os.path.join(tiny_cfg["runs_dir"], "tiny"))["train/l1"]
    assert not math.isfinite(values[-1]) and all(math.isfinite(v) for v in values[:-1])
    for path in saved:
        weights = state_dict_of(path)
        assert all(torch.isfinite(w).all() for w in weights.values()), path


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_on_the_concatenated_batch(tiny_cfg):
    """DDP with gloo on CPU: rank r trains on the r-th half of each global batch; the averaged gradients
    then equal those of one process on the whole batch, so the weights agree within float tolerance."""
    cfg = dict(tiny_cfg, max_steps=4, val_every=2, ckpt_every=2, log_every=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *cli_args(cfg, run="ddp", batch_size=2)[1:], "device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Using cpu device, 2 processes") == 1  # rank 0 alone reports
    train.train(dict(cfg, run="single", batch_size=4))
    ddp = final_weights(cfg, "ddp")
    single = final_weights(cfg, "single")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
    run_files = sorted(os.listdir(os.path.join(cfg["runs_dir"], "ddp")))
    assert len([f for f in run_files if f.startswith("events.out")]) == 1  # one writer: rank 0's
    summary = json.load(open(os.path.join(cfg["runs_dir"], "ddp", "summary.json")))
    assert summary["processes"] == 2 and summary["samples"] == 4 * 4


@pytest.mark.slow
def test_resume_with_another_world_size_continues_the_sample_stream(tiny_cfg):
    cfg = dict(tiny_cfg, max_steps=2, val_every=2, ckpt_every=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *cli_args(cfg, batch_size=2)[1:], "device=cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = train.train(dict(cfg, batch_size=2, max_steps=4, resume="auto"))
    assert summary["steps"] == 4 and summary["samples"] == 2 * 4 + 2 * 2 and summary["processes"] == 1


def test_channels_last_changes_the_layout_not_the_result(tiny_cfg, monkeypatch):
    build_networks, nhwc_weights = train.build_networks, []

    def recording_layout(cfg, device, memory_format):
        networks = build_networks(cfg, device, memory_format)
        weight = networks.model.state_dict()["body.0.weight"]  # 3x3 from 3 channels: the layouts differ
        nhwc_weights.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return networks
    monkeypatch.setattr(train, "build_networks", recording_layout)
    train.train(dict(tiny_cfg, run="nhwc", max_steps=5, channels_last="on"))
    train.train(dict(tiny_cfg, run="nchw", max_steps=5, channels_last="off"))
    nhwc = final_weights(tiny_cfg, "nhwc")
    nchw = final_weights(tiny_cfg, "nchw")
    for key in nchw:
        torch.testing.assert_close(nhwc[key], nchw[key], atol=1e-5, rtol=1e-4)
    assert nhwc_weights == [True, False]


# ---- Task 6: adversarial training (gan=true) ----

@pytest.fixture
def gan_cfg(tiny_cfg):
    """A tiny residual model trained with pixel loss, and the config of a GAN run that starts from it."""
    train.train(dict(tiny_cfg, run="pixel", model="residual", max_steps=4))
    return dict(tiny_cfg, run="gan", model="residual", gan=True, init=os.path.join(tiny_cfg["ckpt_dir"], "pixel",
                                                                                   "model.pt"), max_steps=6,
                val_every=3, ckpt_every=3)


def test_gan_steps_update_generator_and_discriminator_and_log_their_losses(gan_cfg):
    train.train(gan_cfg)
    start = state_dict_of(gan_cfg["init"])
    ckpt_dir = os.path.join(gan_cfg["ckpt_dir"], "gan")
    state = torch.load(os.path.join(ckpt_dir, "step000006.pt"), weights_only=True)
    first = torch.load(os.path.join(ckpt_dir, "step000003.pt"), weights_only=True)
    assert all(not torch.equal(start[k], state["model"][k]) for k in start)  # every generator tensor moved
    assert any(not torch.equal(first["discriminator"][k], state["discriminator"][k]) for k in state["discriminator"])
    assert "d_optimizer" in state and state["train_config"]["gan"] is True
    scalars = read_scalars(os.path.join(gan_cfg["runs_dir"], "gan"))
    assert {"train/l1", "train/adv", "train/d_loss", "train/d_real", "train/d_fake", "val/sharpness"} <= set(scalars)
    assert all(0 < v < 1 for v in scalars["train/d_real"][1] + scalars["train/d_fake"][1])
    assert os.path.getsize(os.path.join(gan_cfg["runs_dir"], "gan", "curves.png")) > 10_000


def test_gan_training_resumes_bit_identically(gan_cfg, capsys):
    train.train(dict(gan_cfg, run="straight"))
    train.train(dict(gan_cfg, run="resumed", max_steps=3))
    capsys.readouterr()
    train.train(dict(gan_cfg, run="resumed", resume="auto"))
    assert resumed_at(capsys, "resumed", 3)
    for name in ("model", "discriminator"):
        straight, resumed = (torch.load(os.path.join(gan_cfg["ckpt_dir"], run, "step000006.pt"), weights_only=True)[name]
                             for run in ("straight", "resumed"))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name


def test_gan_init_from_another_architecture_is_refused_in_one_line(gan_cfg):
    with pytest.raises(SystemExit, match=r"init=.*pixel/model.pt: holds another model: channels=8 \(configured 16\)"):
        train.train(dict(gan_cfg, channels=16))


@pytest.mark.parametrize("kind", ["standard", "relativistic"])
def test_adversarial_losses_reward_the_side_that_wins(kind):
    confident_real, confident_fake = torch.full((4,), 8.0), torch.full((4,), -8.0)
    # a discriminator that separates real from fake perfectly has ~0 loss; its generator a large one
    assert train.discriminator_loss(confident_real, confident_fake, kind) < 0.01
    assert train.generator_loss(confident_real, confident_fake, kind) > 3
    # fooled: fakes scored as real
    assert train.generator_loss(confident_fake, confident_real, kind) < 0.01


def test_batches_made_on_the_device_train_the_same_weights(tiny_cfg):
    train.train(dict(tiny_cfg, run="loader", max_steps=4, data_on_device="off"))
    train.train(dict(tiny_cfg, run="device", max_steps=4, data_on_device="on"))
    loader, device = (final_weights(tiny_cfg, run) for run in ("loader", "device"))
    assert all(torch.allclose(loader[k], device[k], atol=1e-6) for k in loader)


def test_bf16_autocast_trains_and_keeps_fp32_weights(tiny_cfg, capsys):
    summary = train.train(dict(tiny_cfg, max_steps=4, amp="bf16"))
    assert "Using cpu device, bf16 autocast" in capsys.readouterr().out
    train.train(dict(tiny_cfg, run="fp32", max_steps=4, amp="off"))
    bf16, fp32 = (final_weights(tiny_cfg, run) for run in ("tiny", "fp32"))
    assert all(w.dtype == torch.float32 for w in bf16.values()) and math.isfinite(summary["final_val"]["psnr"])
    assert not all(torch.equal(bf16[k], fp32[k]) for k in bf16)  # the steps were computed in bf16


# ---- the final model's recipe: dihedral augmentation, warm-up + cosine schedule, moving average of the weights ----

def test_learning_rate_schedules():
    constant = config.parse_overrides(["lr=1e-3"])
    assert {train.learning_rate(constant, s) for s in (0, 10, 10**6)} == {1e-3}
    cosine = config.parse_overrides(["lr=1e-3", "lr_schedule=cosine", "warmup_steps=10", "lr_min=1e-5",
                                     "max_steps=110"])
    rates = [train.learning_rate(cosine, s) for s in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)  # linear warm-up
    assert all(a > b for a, b in zip(rates[10:], rates[11:]))  # then only down
    assert train.learning_rate(cosine, 60) == pytest.approx((1e-3 + 1e-5) / 2)  # half way down at half way
    assert rates[-1] < 1.05e-5 and train.learning_rate(cosine, 110) == pytest.approx(1e-5)  # lr_min at max_steps


def recipe_cfg(cfg):
    return dict(cfg, augment="dihedral", jitter=0.0, lr_schedule="cosine", warmup_steps=3, lr_min=1e-5, ema=0.9,
                max_steps=12, ckpt_every=3, val_every=6)


def test_adam_is_given_the_warm_up_then_the_cosine_learning_rates(tiny_cfg, monkeypatch):
    cfg = recipe_cfg(tiny_cfg)
    used_rates, step = [], train.training_step
    monkeypatch.setattr(train, "training_step", lambda model, networks, *args, **kwargs: (
        used_rates.append(networks.optimizer.param_groups[0]["lr"]), step(model, networks, *args, **kwargs))[1])
    train.train(cfg)
    lr, lr_min = cfg["lr"], cfg["lr_min"]  # warm-up over 3 steps, then half a cosine over the other 9 to lr_min
    assert used_rates[:4] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr])  # what Adam was given, step by step
    assert used_rates[11] == pytest.approx(lr_min + (lr - lr_min) * (1 + math.cos(math.pi * 8 / 9)) / 2)
    assert len(used_rates) == 12 and all(a > b for a, b in zip(used_rates[3:12], used_rates[4:12]))


def test_recipe_resumes_bit_identically_and_saves_the_average(tiny_cfg, capsys):
    cfg = recipe_cfg(tiny_cfg)
    train.train(dict(cfg, run="straight"))
    train.train(dict(cfg, run="resumed"))
    ckpt_dir = os.path.join(cfg["ckpt_dir"], "resumed")
    for name in ("step000012.pt", "step000009.pt", "model.pt"):  # as if killed after step 6
        os.remove(os.path.join(ckpt_dir, name))
    capsys.readouterr()
    train.train(dict(cfg, run="resumed", resume="auto"))
    assert resumed_at(capsys, "resumed", 6)
    straight = torch.load(os.path.join(cfg["ckpt_dir"], "straight", "step000012.pt"), weights_only=True)
    resumed = torch.load(os.path.join(ckpt_dir, "step000012.pt"), weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    final = state_dict_of(os.path.join(ckpt_dir, "model.pt"))
    average = {k.removeprefix("module."): v for k, v in resumed["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(final[k], average[k]) for k in final)  # model.pt holds the average ...
    assert not all(torch.equal(final[k], resumed["model"][k]) for k in final)  # ... not the last weights
    raw = state_dict_of(os.path.join(ckpt_dir, "model_raw.pt"))  # ... which are beside it
    assert all(torch.equal(raw[k], resumed["model"][k]) for k in final)
    steps, rates = read_scalars(os.path.join(cfg["runs_dir"], "straight"))["train/lr"]
    assert steps == list(range(1, 13))  # logged with the training values: the rate of the step just taken
    assert rates == pytest.approx([train.learning_rate(cfg, step - 1) for step in steps])


def test_a_scheduled_run_cannot_be_extended_silently(tiny_cfg):
    cfg = recipe_cfg(tiny_cfg)
    train.train(cfg)
    with pytest.raises(SystemExit, match="max_steps=12 \\(now 20\\)"):
        train.train(dict(cfg, max_steps=20, resume="auto"))
    train.train(dict(tiny_cfg, run="constant", max_steps=12))  # a constant learning rate can be extended
    assert train.train(dict(tiny_cfg, run="constant", max_steps=14, resume="auto"))["steps"] == 14


@pytest.mark.slow
def test_a_decompression_bomb_in_the_data_folder_gives_one_line_and_little_memory(tiny_cfg, tmp_path):
    import shutil

    from conftest import run_script, write_bomb_png

    folder = tmp_path / "train"
    shutil.copytree(tiny_cfg["data_dir"], folder)
    bomb = write_bomb_png(folder / "bomb.png")
    status, err, peak_mb = run_script("train.py", cli_args(dict(tiny_cfg, data_dir=str(folder), run="bomb"))[2:])
    assert status == 1 and err.strip().splitlines()[-1] == (
        f"data error: {bomb}: 30000x30000 px (900 megapixels) is above max_pixels=100000000; raise max_pixels to "
        "read it (bad_files=skip leaves such files out)")
    assert peak_mb < 1500


@pytest.mark.slow
def test_a_read_only_runs_or_checkpoint_folder_stops_before_the_work_in_one_line(tiny_cfg, read_only_dir):
    from conftest import refused_before

    for key in ("runs_dir", "ckpt_dir"):
        cfg = dict(tiny_cfg, run="ro", max_steps=2, **{key: str(read_only_dir.path / key)})
        status, err = refused_before(train, "build_networks", "train.py", cli_args(cfg)[2:], lambda: train.train(cfg),
                                     read_only_dir.mounted)
        assert status == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"error: cannot write {read_only_dir.path / key}"), err
        assert "Read-only file system (" in err and " MB free on " in err


@pytest.mark.slow
def test_a_disk_that_fills_up_stops_in_one_line_and_resume_continues_after_freeing_space(tiny_cfg, tmp_path,
                                                                                         monkeypatch):
    """A 2.5 MB tmpfs, filled so that the step-5 checkpoint and model_best.pt fit and step 10 does not (where root
    may not mount, torch.save fails as on a full disk: RuntimeError 'unexpected pos' from an ENOSPC)."""
    import errno
    import shutil

    from conftest import mount_tmpfs, run_or_call, unmount

    tiny_cfg = dict(tiny_cfg, channels=32, num_blocks=2)  # checkpoints of ~0.5 MB: the tmpfs' pages do not matter
    train.train(dict(tiny_cfg, run="probe", max_steps=5, ckpt_every=5, val_every=5))
    probe = os.path.join(tiny_cfg["ckpt_dir"], "probe")
    sizes = {name: os.path.getsize(os.path.join(probe, name)) for name in ("step000005.pt", "model_best.pt")}
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, "size=2500k")
    cfg = dict(tiny_cfg, run="full", ckpt_dir=str(disk), max_steps=10, ckpt_every=5, val_every=5)
    try:
        if mounted:
            room = sizes["step000005.pt"] * 1.5 + sizes["model_best.pt"] + 8192  # + config.json; step 10 does not fit
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * int(shutil.disk_usage(disk).free - room))
        else:
            real_save, saves = checkpoints.torch.save, []

            def full_disk_save(payload, f):
                saves.append(f.name)
                if len(saves) > 2:  # step 5 and model_best.pt are written
                    try:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    except OSError:
                        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
                return real_save(payload, f)
            monkeypatch.setattr(checkpoints.torch, "save", full_disk_save)
        status, err = run_or_call("train.py", cli_args(cfg)[2:], lambda: train.train(cfg), mounted)
        step10 = disk / "full" / "step000010.pt"
        assert status == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"error: cannot write {step10}: No space left on device ("), err
        assert " MB free on " in err.strip().splitlines()[-1]
        assert sorted(os.listdir(disk / "full")) == ["config.json", "model_best.pt", "step000005.pt"]  # no tmp file
        assert checkpoints.load_checkpoint(str(disk / "full" / "step000005.pt"))["step"] == 5
        if mounted:
            os.remove(disk / "filler")
        else:
            monkeypatch.setattr(checkpoints.torch, "save", real_save)
        if mounted:
            resumed = subprocess.run(cli_args(cfg) + ["resume=auto"], capture_output=True, text=True, timeout=300)
            assert resumed.returncode == 0, resumed.stderr
            assert "Resuming run 'full' at step 5" in resumed.stdout
        else:
            assert train.train(dict(cfg, resume="auto"))["steps"] == 10
        assert checkpoints.load_checkpoint(str(disk / "full" / "model.pt"))["step"] == 10
    finally:
        if mounted:
            unmount(disk)


def gan_step_gradients(fm_weight):
    """One GAN step of a tiny generator and discriminator (seeded): (the gradients it left in the generator and
    in D between its two steps, the generator's gradients when D steps, the logged values)."""
    import contextlib

    from models import BasicSRModel, Discriminator

    torch.manual_seed(0)
    model, discriminator = BasicSRModel(num_blocks=1, channels=4, residual=True), Discriminator(channels=4)
    networks = train.Networks(model, torch.optim.Adam(model.parameters(), lr=1e-3), discriminator=discriminator,
                              d_optimizer=torch.optim.Adam(discriminator.parameters(), lr=1e-3))
    seen = {}
    real_d_zero_grad, real_d_step = networks.d_optimizer.zero_grad, networks.d_optimizer.step

    def d_zero_grad(**kwargs):  # called between the two steps: what the generator's step left in D
        seen["d_after_generator_step"] = [p.grad for p in discriminator.parameters()]
        seen["generator_grads"] = [p.grad.clone() for p in model.parameters()]
        real_d_zero_grad(**kwargs)

    def d_step():
        seen["generator_grads_after_d"] = [p.grad.clone() for p in model.parameters()]
        real_d_step()

    networks.d_optimizer.zero_grad, networks.d_optimizer.step = d_zero_grad, d_step
    low_res, high_res = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32)
    values = train.gan_step(model, networks, low_res, high_res, contextlib.nullcontext(), "relativistic", 0.1,
                            fm_weight=fm_weight)
    return seen, values


@pytest.mark.parametrize("fm_weight", [0.0, 1.0])
def test_a_gan_step_sends_the_generator_losses_to_the_generator_only(fm_weight):
    """The generator's step leaves no gradient in the discriminator (frozen), D's step none in the generator
    (predictions detached); with fm_weight the feature matching is logged."""
    seen, values = gan_step_gradients(fm_weight)
    assert all(grad is None for grad in seen["d_after_generator_step"])
    assert all(torch.equal(a, b) for a, b in zip(seen["generator_grads"], seen["generator_grads_after_d"]))
    assert ("fm" in values) == bool(fm_weight) and all(torch.isfinite(v) for v in values.values())


def test_feature_matching_moves_the_generator():
    without, with_fm = (gan_step_gradients(fm_weight)[0]["generator_grads"] for fm_weight in (0.0, 1.0))
    assert not all(torch.equal(a, b) for a, b in zip(without, with_fm))


def test_feature_matching_pulls_the_prediction_features_towards_hrs_and_not_back():
    real = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 8, 4, 4, requires_grad=True)]
    fake = [torch.rand(2, 4, 8, 8, requires_grad=True), torch.rand(2, 8, 4, 4, requires_grad=True)]
    matching = train.feature_matching(real, fake)
    matching.backward()
    assert matching.item() == pytest.approx(sum(F.l1_loss(f, r).item() for r, f in zip(real, fake)) / 2)
    assert all(r.grad is None for r in real) and all(f.grad is not None and f.grad.abs().sum() > 0 for f in fake)
    assert train.feature_matching([t.detach() for t in real], [t.detach() for t in real]).item() == 0


def test_the_moving_average_follows_its_decay_and_only_the_newest_step_checkpoints_are_kept(tiny_cfg):
    cfg = dict(recipe_cfg(tiny_cfg), ckpt_every=1, max_steps=5, val_every=5)  # ema=0.9
    train.train(cfg)
    saved = checkpoints.step_checkpoints(os.path.join(cfg["ckpt_dir"], cfg["run"]))
    assert [os.path.basename(p) for p in saved] == ["step000005.pt", "step000004.pt", "step000003.pt"]  # 3 kept
    before, after = (torch.load(path, weights_only=True) for path in saved[1::-1])
    for key, weights in after["model"].items():  # average_5 = 0.9 average_4 + 0.1 weights_5
        torch.testing.assert_close(after["ema"][f"module.{key}"], 0.9 * before["ema"][f"module.{key}"] + 0.1 * weights)
