"""The cluster job scripts: syntax, a local run of each with a tiny config, and (slow) a real local Slurm."""
import glob
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import CODE

pytestmark = pytest.mark.slow  # each test runs the job scripts' shells and trainings: make test-slow (CI)

ROOT = os.path.dirname(CODE)
JOBS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.sbatch")) + glob.glob(os.path.join(ROOT, "jobs", "*.bsub")))


def tiny_args(tiny_cfg, **changes):
    cfg = dict(tiny_cfg, **{"max_steps": 3, "val_every": 3, "ckpt_every": 3, **changes})
    keys = ("data_dir", "eval_dir", "runs_dir", "ckpt_dir", "num_blocks", "channels", "patch_size", "batch_size",
            "max_steps", "val_every", "ckpt_every", "log_every", "num_workers", "device")
    return [f"{k}={cfg[k]}" for k in keys]


def job_env(**extra):
    """Use the venv running the tests; no module system here."""
    return dict(os.environ, **{"SR_VENV": sys.prefix, "SR_MODULES": "", "OMP_NUM_THREADS": "1", **extra})


def run_job(script, args, **env):
    return subprocess.run(["bash", os.path.join("jobs", script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=job_env(**env))


@pytest.mark.parametrize("path", JOBS, ids=os.path.basename)
def test_job_scripts_parse_and_carry_their_scheduler_settings(path):
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read()
    if path.endswith(".sbatch"):
        for option in ("--time", "--output", "--signal=B:USR1@300", "--requeue", "--mem-per-cpu"):
            assert f"#SBATCH {option}" in text, option
        assert "requeue_if_interrupted" in text
    else:
        for option in ("-W", "-n", '-R "rusage[mem=4096,ngpus_excl_p=1]"', "-o runs/", "-wa USR1", "-wt 5", '-Q "75"'):
            assert f"#BSUB {option}" in text, option
        assert "env2lmod" in text and "SR_MODULES=" not in text  # env.sh's Python 3.11 stack: torch needs 3.10+
    assert "source jobs/env.sh" in text and "resume=auto" in text


@pytest.mark.parametrize("path", JOBS, ids=os.path.basename)
def test_job_scripts_ask_for_the_gpu_and_let_arguments_override_it(path):
    """Every training command gets device=cuda (SR_DEVICE) before the user's arguments, which come last and win."""
    script = open(path).read().replace("\\\n", " ")  # a command continued on the next line is one line
    commands = [line for line in script.splitlines() if "code/train.py" in line and not line.lstrip().startswith("#")]
    assert commands
    for line in commands:
        assert '"$DEVICE_ARG"' in line and line.rstrip().endswith('"$@"'), line
        assert line.index('"$DEVICE_ARG"') < line.index('"$@"'), line


def test_a_gpu_job_without_a_usable_gpu_stops_at_once_with_one_line(tiny_cfg):
    args = [a for a in tiny_args(tiny_cfg) if not a.startswith("device=")]
    done = run_job("train.sbatch", [*args, "run=no_gpu"])
    assert done.returncode == 1
    assert "device=cuda but CUDA is not available" in done.stderr.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(tiny_cfg["ckpt_dir"], "no_gpu"))
    assert run_job("train.sbatch", [*args, "run=auto"], SR_DEVICE="auto").returncode == 0  # the setting to run anywhere


def test_multi_node_script_has_a_port_per_job_and_passes_cpus_to_srun():
    text = open(os.path.join(ROOT, "jobs", "train_multi.sbatch")).read()
    assert ":29500" not in text and '--rdzv_endpoint="$head_node:$port"' in text and "SLURM_JOB_ID % 20000" in text
    assert 'srun --kill-on-bad-exit=1 --cpus-per-task="$SLURM_CPUS_PER_TASK"' in text


@pytest.mark.parametrize("script", ["train.sbatch", "train.bsub"])
def test_single_training_scripts_run_locally(script, tiny_cfg):
    done = run_job(script, [*tiny_args(tiny_cfg), f"run=local_{script.split('.')[1]}"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], f"local_{script.split('.')[1]}", "model.pt"))


def test_lsf_reads_overrides_from_train_args_since_bsub_takes_none(tiny_cfg):
    done = run_job("train.bsub", tiny_args(tiny_cfg), TRAIN_ARGS="run=from_env max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = open(os.path.join(tiny_cfg["runs_dir"], "from_env", "summary.json")).read()
    assert '"steps": 3' in summary  # command-line arguments come after TRAIN_ARGS and win


@pytest.mark.parametrize("script", ["lr_sweep.sbatch", "lr_sweep.bsub"])
def test_sweeps_run_every_learning_rate_locally_and_survive_a_divergence(script, tiny_cfg, tmp_path):
    """The venv's python made to exit 3 (train.py's divergence) for lr 1e-2 alone: the other rates still train."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{venv}:$PATH"\n')
    (venv / "python").write_text('#!/bin/bash\nfor a in "$@"; do [ "$a" = lr=1e-2 ] && exit 3; done\n'
                                 f'exec "{sys.executable}" "$@"\n')
    (venv / "python").chmod(0o755)
    done = run_job(script, [*tiny_args(tiny_cfg, max_steps=2, val_every=2, ckpt_every=2)], SR_VENV=str(venv.parent))
    assert "sweep finished: 1 of 5 runs did not complete" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "lr=1e-2: exit status 3" in done.stdout
    trained = ["lr_1e-3", "lr_1e-4", "lr_1e-5", "lr_1e-6"]
    assert sorted(os.listdir(tiny_cfg["runs_dir"])) == trained
    for run in trained:
        assert f"lr={run[3:]}: exit status 0" in done.stdout
        assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], run, "model.pt"))


def test_multi_process_script_runs_torchrun_locally(tiny_cfg):
    done = run_job("train_multi.sbatch", [*tiny_args(tiny_cfg), "run=multi"], NPROC="2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 processes" in done.stdout
    assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], "multi", "model.pt"))


def test_usr1_to_the_job_shell_is_forwarded_and_the_run_stops_with_75(tiny_cfg):
    args = [*tiny_args(tiny_cfg, max_steps=100000, ckpt_every=100000, val_every=5, log_every=1), "run=usr1"]
    process = subprocess.Popen(["bash", "jobs/train.sbatch", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=job_env())
    for line in process.stdout:
        if line.startswith("step 5:"):
            break
    process.send_signal(10)  # SIGUSR1 to the batch shell alone, as Slurm's --signal=B: does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err[-2000:]
    assert "USR1 received" in err and "stopped by SIGUSR1" in err


def slurm(command, env):
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.manual
def test_real_local_slurm_runs_the_job_and_requeues_it_after_usr1(tiny_cfg, tmp_path):
    """Starts slurmctld + slurmd on localhost, submits jobs/train.sbatch twice: once straight through, once
    signalled with USR1 mid-run, which must checkpoint, requeue itself and finish."""
    slurm_dir = tmp_path / "slurm"
    started = subprocess.run(["bash", os.path.join(ROOT, "tests", "local_slurm.sh"), "start", str(slurm_dir)],
                             capture_output=True, text=True, timeout=600)
    if started.returncode == 2:
        pytest.skip(started.stdout.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    env = job_env(SLURM_CONF=str(slurm_dir / "slurm.conf"))
    small = ["--cpus-per-task=1", "--mem-per-cpu=1G", "--time=10"]  # this machine, not a GPU node
    try:
        first = slurm(["sbatch", "--parsable", *small, "jobs/train.sbatch", *tiny_args(tiny_cfg), "run=slurm_a"], env)
        assert first.returncode == 0, first.stderr
        args = [*tiny_args(tiny_cfg, max_steps=1500, ckpt_every=20, val_every=500, log_every=1), "run=slurm_b"]
        second = slurm(["sbatch", "--parsable", *small, "jobs/train.sbatch", *args], env)
        job_b = second.stdout.strip()
        ckpt_b = os.path.join(tiny_cfg["ckpt_dir"], "slurm_b")
        assert wait_for(lambda: glob.glob(os.path.join(ckpt_b, "step*.pt")), 120), "second job never checkpointed"
        assert slurm(["scancel", "--signal=USR1", "--batch", job_b], env).returncode == 0
        # Slurm holds a requeued job back for two minutes; let it start again as soon as it is pending
        assert wait_for(lambda: "Restarts=1" in slurm(["scontrol", "show", "job", job_b], env).stdout, 60)
        slurm(["scontrol", "update", f"JobId={job_b}", "BeginTime=now"], env)
        done = lambda: slurm(["squeue", "-h"], env).stdout.strip() == ""  # noqa: E731
        assert wait_for(done, 300), slurm(["squeue"], env).stdout
    finally:
        subprocess.run(["bash", os.path.join(ROOT, "tests", "local_slurm.sh"), "stop", str(slurm_dir)], timeout=60)
    assert os.path.isfile(os.path.join(tiny_cfg["ckpt_dir"], "slurm_a", "model.pt"))
    assert any(n.startswith("events.out") for n in os.listdir(os.path.join(tiny_cfg["runs_dir"], "slurm_a")))
    log = open(os.path.join(ROOT, "runs", f"slurm-sr-train-{job_b}.out")).read()
    os.remove(os.path.join(ROOT, "runs", f"slurm-sr-train-{job_b}.out"))
    os.remove(os.path.join(ROOT, "runs", f"slurm-sr-train-{first.stdout.strip()}.out"))
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", log)
    assert stopped and "requeueing job" in log and "restart 1" in log, log[-3000:]
    assert f"Resuming run 'slurm_b' at step {stopped.group(1)}" in log
    summary = open(os.path.join(tiny_cfg["runs_dir"], "slurm_b", "summary.json")).read()
    assert '"steps": 1500' in summary
