"""The machine a script runs on: device, precision, memory layout, data path, malloc, generator states, and
the file systems it writes to (a full disk, a quota or a read-only folder ends in one line).

Every entry point asks here instead of deciding for itself, so that the training loop reads as training
and one place knows the hardware. Measured speeds behind these choices: README.md, Performance.
"""
import atexit
import contextlib
import ctypes
import multiprocessing.util  # before the atexit registration below, so that ours runs first
import os
import platform
import random
import shutil
import signal
import tempfile
import threading

import numpy as np
import torch

# what a scheduler or a user sends to stop a training run between steps (train.StopRequest)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# NVIDIA GPUs with native bf16 tensor cores (Ampere, compute capability 8.0, and newer); older cards emulate it
BF16_CAPABILITY = (8, 0)


CPUINFO = "/proc/cpuinfo"  # Linux's description of the CPU; macOS has none, Arm's lists no clock


def cpuinfo_lines():
    """The lines of CPUINFO, or none where it cannot be read."""
    try:
        with open(CPUINFO) as f:
            return f.readlines()
    except OSError:
        return []


def cpu_has(flag):
    """Whether the CPU lists `flag` (avx512f, amx_bf16, ...) in CPUINFO; False where there is none."""
    return any(line.startswith("flags") and f" {flag} " in f"{line.rstrip()} " for line in cpuinfo_lines())


def cpu_runs(flag):
    """Whether the CPU has `flag` and torch may use it: ATEN_CPU_CAPABILITY=avx2 (torch's element-wise kernels) and
    ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN's convolutions) cap the instructions below what the CPU lists, e.g. to mimic
    an AVX2-only laptop; bf16 on a capped CPU is emulated and many times slower than fp32."""
    if not cpu_has(flag):
        return False
    if flag.startswith(("avx512", "amx")) and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if onednn in ("ALL", "DEFAULT") or "AMX" in onednn:
        return True
    if flag.startswith("amx"):
        return False
    if flag == "avx512_bf16":
        return any(name in onednn for name in ("BF16", "FP16", "AVX10"))
    return not flag.startswith("avx512") or "AVX512" in onednn or "AVX10" in onednn


def cpu_name():
    names = [line.split(":", 1)[1].strip() for line in cpuinfo_lines() if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cuda_kernels_for(capability, arch_list):
    """Whether a torch build with `arch_list` (torch.cuda.get_arch_list()) can run on a GPU of `capability`:
    a binary for sm_XY runs on sm_XZ with Z >= Y (same major), and PTX (compute_XY) on any newer GPU."""
    major, minor = capability
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = "".join(c for c in number if c.isdigit())  # sm_90a is sm_90 with extra features
        if not digits:
            continue
        arch_major, arch_minor = int(digits[:-1] or 0), int(digits[-1])
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= (major, minor):
            return True
    return False


def check_cuda_device(device):
    """Stop with one line if the installed torch has no kernels for this GPU (it would die at the first one)."""
    capability, arch_list = torch.cuda.get_device_capability(device), torch.cuda.get_arch_list()
    if not cuda_kernels_for(capability, arch_list):
        raise SystemExit(
            f"error: {torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}) is not supported by this "
            f"torch {torch.__version__} build (kernels for {', '.join(arch_list)}); request a newer GPU type, e.g. "
            f"sbatch --gpus=rtx_4090:1 jobs/train.sbatch ... or bsub -R \"select[gpu_model0==NVIDIAGeForceRTX4090]\"")


def pick_device(name):
    """'auto' means CUDA when available; asking for CUDA where it cannot start, or on a GPU the installed torch
    has no kernels for, is a one-line error before any work (a job script never trains on the CPU by accident)."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"config error: device={name} but CUDA is not available here (no GPU, or a driver too old "
                         f"for torch {torch.__version__}, CUDA {torch.version.cuda}); use device=cpu or auto")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        check_cuda_device(device)
    return device


def channels_last_helps(setting, device):
    """NHWC convolutions: faster on GPU tensor cores and with oneDNN on AVX-512 CPUs, slower on AVX2-only CPUs."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" or cpu_runs("avx512f")


def use_bf16(cfg, device):
    """amp=auto turns bf16 autocast on where the hardware computes in bf16: NVIDIA GPUs of compute capability
    8.0 or newer, and CPUs with AMX tiles or AVX512-BF16. Elsewhere bf16 is emulated (Turing GPUs, AVX2 CPUs)
    and slower than fp32, so fp32 stays. Weights, optimiser and evaluation are fp32 in any case."""
    if cfg["amp"] != "auto":
        return cfg["amp"] == "bf16"
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= BF16_CAPABILITY
    return cpu_runs("amx_bf16") or cpu_runs("avx512_bf16")


def data_workers(cfg, device):
    """num_workers, with -1 resolved: none on a CPU (workers would take cores from the convolutions), 4 with CUDA."""
    if cfg["num_workers"] >= 0:
        return cfg["num_workers"]
    return 4 if device.type == "cuda" else 0


def batches_on_device(cfg, device):
    """Whether training batches are made batch-wise on the device (batches.DeviceBatches) rather than sample by
    sample in a DataLoader: auto = always on a GPU, and on a CPU when no DataLoader workers are used."""
    if cfg["data_on_device"] != "auto":
        return cfg["data_on_device"] == "on"
    return device.type == "cuda" or data_workers(cfg, device) == 0


def tune_malloc(cfg):
    """malloc=tuned: glibc keeps freed memory in its heap (no mmap, no trimming) instead of returning it to the
    kernel, so PyTorch's activations do not page-fault at every step or evaluation batch (a batch can free more
    than 1 GiB at once; README, Performance). The peak is unchanged; results are unchanged.
    Returns whether the setting took effect (False off glibc, or with malloc=default)."""
    if cfg["malloc"] != "tuned":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def with_memory_returned(upscale):
    """`upscale` that first gives the C heap's free pages back to the kernel (glibc's malloc_trim) when the image
    size changes: with malloc=tuned nothing is trimmed on free, and whole images of many sizes leave freed blocks
    that no later size fits, so an evaluation's memory grew with its number of photos (README, Performance).
    Images of one size reuse their blocks untrimmed. Off glibc a no-op."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return upscale
    last_shape = None

    def upscale_after_trim(low_res):
        nonlocal last_shape
        if low_res.shape != last_shape:
            trim(0)
            last_shape = low_res.shape
        return upscale(low_res)
    return upscale_after_trim


def bound_kernel_cache(capacity=16):
    """oneDNN keeps a compiled convolution for every input shape it has seen (1024 by default), each with buffers
    of its size, so evaluating photos of many sizes grows with their number (README, Performance). Whole-image
    scripts keep the `capacity` most recent, enough for the tiles of one size. Results are unchanged. Call it before
    the first convolution."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


def describe(device, bf16):
    """What a run computed on, for its checkpoints and summary: a resumed run says when this changes."""
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        where = f"{torch.cuda.get_device_name(device)}, TF32 {'on' if tf32 else 'off'}"
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} threads"
    return f"{where}, {'bf16 autocast' if bf16 else 'fp32'}"


def rng_states(device):
    """The global generators' states, for a checkpoint: Python, NumPy, torch's CPU generator and, on a GPU,
    that of the run's own device only (a resumed run may see fewer GPUs)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                        "has_gauss": has_gauss, "gauss": gauss}}
    if device.type == "cuda":
        states["cuda_device"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    if device.type == "cuda" and "cuda_device" in states:
        torch.cuda.set_rng_state(states["cuda_device"], device)


def ignore_stop_signals(worker_id=None):
    """For DataLoader workers: stopping is the training process's job, which needs them for the current step.
    (train() shuts them down when it leaves; kill_data_workers covers any that a kept traceback holds alive.)"""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@atexit.register
def kill_data_workers():
    """At interpreter exit, kill the daemonic children (DataLoader workers) still alive. multiprocessing's own exit
    handler, which runs after this one, stops them with SIGTERM and waits: workers that ignore SIGTERM
    (ignore_stop_signals) would make the process hang there for ever, after its work and its last line.
    Runs in the main thread (atexit), where signal handlers may be set."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # PyTorch's handler would report each kill as a failure
    for worker in workers:
        worker.kill()
        worker.join()


# ---- writing outputs ----

def write_failure(path, err):
    """The one line for a write that failed (full disk, quota, read-only or forbidden folder): the file, the reason
    and the space left where it was going, so that the user knows what to free or where to write instead."""
    parent = os.path.abspath(path)
    while not os.path.isdir(parent) and os.path.dirname(parent) != parent:  # the nearest folder: the space it has
        parent = os.path.dirname(parent)
    try:
        free = f"{shutil.disk_usage(parent).free / 1e6:,.1f} MB free on {parent}"
    except OSError:
        free = f"free space on {parent} unknown"
    reason = os.strerror(err.errno) if err.errno else str(err) or type(err).__name__
    return f"error: cannot write {path}: {reason} ({free})"


@contextlib.contextmanager
def replaced_whole(path):
    """The one way outputs are written whole or not at all: yields a temporary path beside `path` for the block to
    write (a file or a folder), which then replaces `path` by renaming. A crash or a full disk meanwhile keeps the
    previous `path` as it was and leaves no partial one; an OSError on the way names `path`."""
    temporary, old = f"{path}.tmp{os.getpid()}", f"{path}.tmp{os.getpid()}old"
    try:
        yield temporary
        if os.path.isdir(temporary) and os.path.lexists(path):  # a folder cannot replace one in a single rename
            os.rename(path, old)
            try:
                os.rename(temporary, path)
            except BaseException:
                os.rename(old, path)  # the previous folder back
                raise
        else:
            os.replace(temporary, path)
    except OSError as err:
        if err.errno is None or not str(err.filename or temporary).startswith(temporary):  # not of the writing
            raise
        raise OSError(err.errno, err.strerror, path) from None
    finally:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(temporary)


def write_file(path, content):
    """Write `content` (str or bytes) to `path` whole or not at all (replaced_whole); a failure ends the script in
    write_failure's line naming `path`."""
    binary = isinstance(content, bytes)
    with failed_writes_exit(path), replaced_whole(path) as temporary:
        with open(temporary, "wb" if binary else "w", newline=None if binary else "") as f:
            f.write(content)


@contextlib.contextmanager
def failed_writes_exit(path):
    """A write that fails inside ends the script with the line of `write_failure`, naming the file the error
    names, else `path`."""
    try:
        yield
    except OSError as err:
        raise SystemExit(write_failure(err.filename or path, err)) from None


def check_writable(folder):
    """Create `folder` if needed and create a file in it, so that an output that cannot be written (read-only file
    system, no permission, a file of that name) stops the script with one line before its work instead of after it."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        what = "a link to nothing" if os.path.islink(folder) and not os.path.exists(folder) else "a file"
        raise SystemExit(f"error: cannot write in {folder}: it is {what}, not a folder")
    with failed_writes_exit(folder):
        os.makedirs(folder, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:  # named after the folder, not the probe's random name
        raise SystemExit(write_failure(folder, err)) from None


class LinesOnly:
    """A file for a progress bar writing into a log (not a terminal): each state of the bar on a line of its own,
    where the bar's carriage returns would run them, and the lines printed beside them (tqdm.write, print), into
    one line of the log."""

    def __init__(self, file):
        self.file = file

    def write(self, text):
        for part in text.split("\r"):
            if part.strip():
                self.file.write(part.rstrip() + "\n")

    def flush(self):
        self.file.flush()


def quiet_writer_threads():
    """TensorBoard writes its event file in a thread, which prints a traceback when a write fails and leaves the
    OSError for the main thread's next write to raise again, where it is reported in one line: that traceback
    is not printed. Other errors of threads are printed as before."""
    threading.excepthook = _print_thread_error_but_oserror


def _print_thread_error_but_oserror(args):
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)
