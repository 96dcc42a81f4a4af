"""Shared fixtures: the code/ modules on sys.path, and small real-photo folders made at test time."""
import os
import sys

import numpy as np
import pytest
from PIL import Image

CODE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code")
sys.path.insert(0, CODE)
SHARED_DATA = os.path.join(os.path.dirname(CODE), "..", "shared", "data")


def photo_crops(size, count):
    """`count` different size x size RGB crops of real photographs shipped by scikit-image."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        top, left = 40 + 13 * i, 60 + 17 * i
        crops.append(np.ascontiguousarray(photo[top:top + size, left:left + size]))
    return crops


def write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(os.path.join(folder, f"img{i:02d}.png"))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """{'train': folder of 4 80x80 photos, 'eval': folder of 2 48x48 photos}."""
    root = tmp_path_factory.mktemp("tiny_data")
    return {"train": write_folder(root / "train", photo_crops(80, 4)),
            "eval": write_folder(root / "eval", photo_crops(48, 2))}


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    """A config for a model and data small enough that a few training steps take a second."""
    import config

    return config.parse_overrides([
        f"data_dir={tiny_data['train']}", f"eval_dir={tiny_data['eval']}", f"runs_dir={tmp_path / 'runs'}",
        f"ckpt_dir={tmp_path / 'checkpoints'}", "run=tiny", "num_blocks=1", "channels=8", "patch_size=32",
        "batch_size=4", "lr=1e-3", "max_steps=20", "log_every=1", "val_every=10", "ckpt_every=10",
        "num_workers=0", "device=cpu", "amp=off",
    ])


def shared_folder(name):
    """Path of a standard set in ../shared/data (where a machine has a copy beside the repo), else in the folder
    that `make data-standard` fills (config.DATA_ROOT: data/, or SR_DATA_ROOT), or skip the test where neither
    has it."""
    import config

    for root in (SHARED_DATA, config.DATA_ROOT):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    pytest.skip(f"{name} not in {SHARED_DATA} nor in {config.DATA_ROOT} (make data-standard)")


def write_bomb_png(path, side=30000, zeros=4 << 20):
    """A PNG whose header says side x side RGB pixels (30000 x 30000: 2.7 GB decoded), followed by a few MB of
    zlib-compressed zeros: a decompression bomb. Nothing in the tests may decode it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * zeros))
                + chunk(b"IEND", b""))
    return str(path)


def write_exif_rotated_jpeg(path, pixels):
    """`pixels` (HxWx3) stored turned by 90 degrees with EXIF orientation 6, as phones store portrait photos:
    a viewer shows `pixels` again."""
    image = Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90)  # stored sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(path, exif=exif, quality=95)
    return str(path)


def run_script(script, args):
    """(exit status, stderr, peak resident MB) of `python code/<script> args...`, measured for that process alone."""
    from speed import run_measured

    return run_measured([sys.executable, os.path.join(CODE, script), *args])


def mount_tmpfs(folder, options):
    """Mount a tmpfs on `folder` (`options`: size=2500k, ro): True where root may mount, else False (the tests then
    mock the OSError instead). Unmount with `unmount`."""
    import subprocess

    os.makedirs(folder, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def unmount(folder):
    import subprocess

    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder on a read-only file system: a tmpfs mounted ro, or where mounting is not allowed (not root) only
    system.check_writable's probe, tempfile.TemporaryFile in it, mocked to fail with EROFS (in this process only:
    `mounted` says which). Mocked, a test shows that the script stops at that probe, before any work."""
    import errno
    import tempfile
    import types

    folder = tmp_path / "read_only"
    mounted = mount_tmpfs(folder, "ro")
    if not mounted:
        def refuse(*args, dir=None, **kwargs):
            if dir is not None and str(dir).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real_temporary_file(*args, dir=dir, **kwargs)
        real_temporary_file = tempfile.TemporaryFile
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    try:
        yield types.SimpleNamespace(path=folder, mounted=mounted)
    finally:
        if mounted:
            unmount(folder)


def refused_before(module, work, script, args, call, real):
    """run_or_call's (exit status, stderr), where call() in this process, with module.<work> made to fail the test if
    it is reached, has stopped with the same line: for a check that must stop a script before that work."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, work, lambda *args, **kwargs: pytest.fail(f"{work} ran before the script stopped"))
        status, err = run_or_call(script, args, call, False)
    if real:
        first_line = err.split(" (")[0]
        status, err = run_or_call(script, args, call, True)
        assert err.strip().splitlines()[-1].startswith(first_line), (first_line, err)
    return status, err


def run_or_call(script, args, call, real):
    """(exit status, stderr) of `python code/<script> args` where the situation is `real` (a mounted file system),
    else of call() in this process, where it is mocked: a SystemExit's message is what stderr would hold."""
    if real:
        status, err, _ = run_script(script, args)
        return status, err
    try:
        call()
    except SystemExit as stop:
        return (1, f"{stop.code}\n") if isinstance(stop.code, str) else (stop.code, "")
    return 0, ""
