"""system.py: device, precision, layout and data-path choices, malloc, and the generator states of a checkpoint.
CUDA is mocked where a CPU cannot show the behaviour (fewer GPUs on resume, old GPUs, Turing's emulated bf16)."""
import errno
import os
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import system
from config import parse_overrides
from conftest import CODE


def test_cuda_without_cuda_is_an_error_before_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        system.pick_device("cuda")
    assert system.pick_device("auto").type == "cpu"


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible 'GPU' of a settable compute capability; nothing runs on it."""
    gpu = {"capability": (8, 6), "name": "NVIDIA GeForce RTX 3090"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    return gpu


def test_a_gpu_the_torch_build_has_no_kernels_for_is_refused_in_one_line(fake_gpu):
    assert system.pick_device("cuda").type == "cuda"
    fake_gpu.update(capability=(7, 0), name="Tesla V100-SXM2-32GB")
    with pytest.raises(SystemExit) as refused:
        system.pick_device("cuda")
    message = str(refused.value)
    assert "\n" not in message and "Tesla V100" in message and "sm_70" in message and "sm_75" in message
    assert "--gpus=" in message  # how to ask the scheduler for a supported type
    with pytest.raises(SystemExit):
        system.pick_device("auto")  # auto picks CUDA when it is there, so it must check too


def test_cuda_binary_compatibility_rules():
    build = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert system.cuda_kernels_for((8, 9), build)  # an sm_86 binary runs on an sm_89 card (RTX 4090)
    assert system.cuda_kernels_for((7, 5), build) and system.cuda_kernels_for((12, 0), build)
    assert not system.cuda_kernels_for((6, 1), build) and not system.cuda_kernels_for((7, 0), build)
    assert not system.cuda_kernels_for((11, 0), build)  # no sm_11x binary and no PTX to compile
    assert system.cuda_kernels_for((11, 0), [*build, "compute_90"])  # PTX runs on any newer GPU
    assert system.cuda_kernels_for((9, 0), ["sm_90a"])


def test_amp_auto_means_bf16_where_the_hardware_computes_in_bf16(monkeypatch, fake_gpu):
    cpu, gpu, auto = torch.device("cpu"), torch.device("cuda"), parse_overrides(["amp=auto"])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # whatever caps this machine runs
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for flags, expected in (({"amx_bf16", "avx512_bf16"}, True), ({"avx512_bf16"}, True), ({"avx512f"}, False), (set(), False)):
        monkeypatch.setattr(system, "cpu_has", lambda flag: flag in flags)
        assert system.use_bf16(auto, cpu) is expected
    assert system.use_bf16(parse_overrides(["amp=off"]), cpu) is False
    assert system.use_bf16(parse_overrides(["amp=bf16"]), cpu) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # True on Turing too: emulation
    fake_gpu.update(capability=(7, 5))
    assert system.use_bf16(auto, gpu) is False
    fake_gpu.update(capability=(8, 0))
    assert system.use_bf16(auto, gpu) is True


def test_data_workers_auto_means_none_on_a_cpu_and_some_with_cuda():
    auto = parse_overrides([])
    assert system.data_workers(auto, torch.device("cpu")) == 0
    assert system.data_workers(auto, torch.device("cuda")) == 4
    assert system.data_workers(parse_overrides(["num_workers=3"]), torch.device("cpu")) == 3


def test_batches_are_made_batch_wise_unless_dataloader_workers_are_asked_for():
    auto, workers = parse_overrides([]), parse_overrides(["num_workers=2"])
    off = parse_overrides(["data_on_device=off"])
    assert system.batches_on_device(auto, torch.device("cuda")) and system.batches_on_device(auto, torch.device("cpu"))
    assert not system.batches_on_device(workers, torch.device("cpu")) and system.batches_on_device(workers, torch.device("cuda"))
    assert not system.batches_on_device(off, torch.device("cuda"))


def test_channels_last_auto_is_on_for_gpus_and_settable():
    assert system.channels_last_helps("off", torch.device("cuda")) is False
    assert system.channels_last_helps("auto", torch.device("cuda")) is True
    assert system.channels_last_helps("on", torch.device("cpu")) is True


def test_tune_malloc_takes_effect_on_glibc_and_only_when_asked():
    assert system.tune_malloc(parse_overrides(["malloc=default"])) is False
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert system.tune_malloc(parse_overrides([])) is on_glibc


def test_describe_names_the_gpu_model_precision_and_tf32(fake_gpu):
    text = system.describe(torch.device("cuda"), bf16=True)
    assert "RTX 3090" in text and "bf16" in text and "TF32" in text
    assert "threads, fp32" in system.describe(torch.device("cpu"), bf16=False)


def test_global_generator_states_survive_a_checkpoint_round_trip(tmp_path):
    from checkpoints import load_checkpoint, save_checkpoint

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    random.random(), np.random.rand(3), torch.rand(2)
    path = save_checkpoint(str(tmp_path / "s.pt"), torch.nn.Linear(1, 1), {"model": "basic", "num_blocks": 1,
                           "channels": 1, "scale": 2, "run": "r"}, 0, rng=system.rng_states(torch.device("cpu")))
    expected = random.random(), np.random.rand(3).tolist(), torch.rand(2).tolist()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    system.set_rng_states(load_checkpoint(path)["rng"], torch.device("cpu"))  # weights_only=True can read them
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(2).tolist()) == expected


class FakeCudaGenerators:
    """`count` visible GPUs, each with its own generator state (a byte tensor, as torch keeps it)."""

    def __init__(self, monkeypatch, count):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(count)]
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))

    def index(self, device):
        index = torch.device(device).index or 0
        if index >= len(self.states):
            raise IndexError("tuple index out of range")
        return index

    def get(self, device="cuda"):
        return self.states[self.index(device)].clone()

    def set(self, state, device="cuda"):
        self.states[self.index(device)] = state.clone()


def test_a_run_from_four_gpus_resumes_on_one(monkeypatch):
    """A checkpoint of a rank on cuda:3 of 4 visible GPUs, resumed where only one GPU is visible (cuda:0)."""
    four = FakeCudaGenerators(monkeypatch, 4)
    saved = system.rng_states(torch.device("cuda", 3))
    assert torch.equal(saved["cuda_device"], four.states[3])
    one = FakeCudaGenerators(monkeypatch, 1)
    system.set_rng_states(saved, torch.device("cuda", 0))
    assert torch.equal(one.states[0], four.states[3])


def test_instructions_capped_by_aten_or_onednn_count_as_missing(monkeypatch):
    """An AVX-512 CPU run as an AVX2 one (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA) must choose as an AVX2 CPU does:
    bf16 there is emulated, 10x slower than fp32."""
    cpu, auto = torch.device("cpu"), parse_overrides([])
    monkeypatch.setattr(system, "cpu_has", lambda flag: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert system.use_bf16(auto, cpu) and system.channels_last_helps("auto", cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not system.use_bf16(auto, cpu) and not system.channels_last_helps("auto", cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core")
    assert not system.use_bf16(auto, cpu) and system.channels_last_helps("auto", cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert system.use_bf16(auto, cpu)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not system.use_bf16(auto, cpu) and not system.channels_last_helps("auto", cpu)


def test_a_process_whose_data_workers_outlive_their_loader_still_exits():
    """Workers ignore SIGTERM (ignore_stop_signals), which multiprocessing's exit handler sends them before waiting
    for them: a loader kept alive to the end (by a traceback, a global) hung the process there, after its last line
    (the CI run that passed its tests and never ended). kill_data_workers ends them first."""
    code = ("import sys, system; from torch.utils.data import DataLoader; "
            "loader = iter(DataLoader(list(range(100)), batch_size=2, num_workers=2, "
            "worker_init_fn=system.ignore_stop_signals)); next(loader); print('done', flush=True)")
    done = subprocess.run([sys.executable, "-c", code], cwd=CODE, capture_output=True, text=True, timeout=120)  # a hang fails here, not the whole suite
    assert done.returncode == 0 and done.stdout == "done\n", done.stderr
    assert done.stderr == ""


def test_evaluation_returns_free_heap_memory_when_the_image_size_changes(monkeypatch):
    """malloc_trim runs before an image of a new size (sizes that differ leave blocks no later one fits), not before
    one of the same size (which reuses them); the outputs are the upscaler's own."""
    import ctypes
    import types

    trims = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: types.SimpleNamespace(malloc_trim=trims.append))
    upscale = system.with_memory_returned(lambda low_res: low_res * 2)
    sizes = [(8, 8), (8, 8), (8, 12), (8, 8), (8, 8)]
    outputs = [upscale(torch.ones(1, 3, *size)) for size in sizes]
    assert len(trims) == 3 and trims == [0, 0, 0]
    assert all(torch.equal(out, torch.full((1, 3, *size), 2.0)) for out, size in zip(outputs, sizes))


def test_without_glibc_the_upscaler_is_left_as_it_is(monkeypatch):
    import ctypes

    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    upscale = lambda low_res: low_res  # noqa: E731
    assert system.with_memory_returned(upscale) is upscale


def test_a_progress_bar_in_a_log_puts_each_state_and_each_message_on_its_own_line():
    import io

    from tqdm import tqdm

    log = io.StringIO()
    bar = tqdm(total=3, file=system.LinesOnly(log), mininterval=0, ascii=True)
    bar.update(1)
    bar.write("step 1: val L1 0.0208, PSNR 27.87 dB", file=bar.fp)
    bar.update(2)
    bar.close()
    lines = log.getvalue().split("\n")
    assert "\r" not in log.getvalue() and "step 1: val L1 0.0208, PSNR 27.87 dB" in lines
    assert [line for line in lines if "|" in line][-1].startswith("100%|") and all(line.strip() for line in lines[:-1])


def test_a_file_and_a_folder_are_replaced_whole_and_a_failure_keeps_the_previous_one(tmp_path, monkeypatch):
    path, folder = tmp_path / "table.md", tmp_path / "page"
    system.write_file(str(path), "old")
    folder.mkdir()
    (folder / "index.html").write_text("old page")
    with pytest.raises(OSError) as failure, system.replaced_whole(str(path)) as temporary:
        with open(temporary, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), temporary)
    assert failure.value.filename == str(path) and path.read_text() == "old"  # named after the output
    real_rename = os.rename

    def second_rename_fails(source, target):
        if str(source).endswith(f".tmp{os.getpid()}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), source)
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError), system.replaced_whole(str(folder)) as temporary:
        os.mkdir(temporary)
        (tmp_path / temporary / "index.html").write_text("new page")
    assert (folder / "index.html").read_text() == "old page"  # the previous folder is back
    monkeypatch.setattr(os, "rename", real_rename)
    with system.replaced_whole(str(folder)) as temporary:
        os.mkdir(temporary)
        (tmp_path / temporary / "index.html").write_text("new page")
    assert (folder / "index.html").read_text() == "new page" and sorted(os.listdir(tmp_path)) == ["page", "table.md"]


def test_an_error_without_errno_keeps_its_own_words():
    with pytest.raises(OSError, match="cannot write mode P as JPEG"), system.replaced_whole("/tmp/never"):
        raise OSError("cannot write mode P as JPEG")


def test_an_output_folder_that_is_a_file_or_lies_under_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as refused:
        system.check_writable(str(tmp_path / "file"))
    assert refused.value.code == f"error: cannot write in {tmp_path / 'file'}: it is a file, not a folder"
    with pytest.raises(SystemExit) as refused:
        system.check_writable(str(tmp_path / "file" / "sub"))
    assert refused.value.code.startswith(f"error: cannot write {tmp_path / 'file' / 'sub'}: Not a directory (")
    assert refused.value.code.endswith(f" MB free on {tmp_path})")  # the space of the nearest folder, not of the file
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(SystemExit) as refused:
        system.check_writable(str(tmp_path / "link"))
    assert refused.value.code == f"error: cannot write in {tmp_path / 'link'}: it is a link to nothing, not a folder"
