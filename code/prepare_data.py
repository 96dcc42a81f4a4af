"""Build the data folders: the embedded demo set, or the standard sets of the SR papers, checked file by file.

    python code/prepare_data.py                               # data/train, data/eval from skimage.data (the demo's)
    python code/prepare_data.py standard                      # T91, BSD200, Set5, Set14, B100 into data/ (~100 MB)
    python code/prepare_data.py standard source=/my/copy      # the same files from a local copy (<copy>/<set>/*.png)
    SR_DATA_ROOT=/scratch/sr python code/prepare_data.py standard sets=Set5,Set14   # where experiments/report look

The standard sets come from two public GitHub repositories at pinned commits; code/standard_sets.tsv lists each
file's address, the SHA-256 of its bytes and the SHA-256 of its pixels. A download is kept only when its bytes
hash as pinned (pooch checks, retries and moves it into place) and a local copy only when its pixels do, so a PNG
copy of one of T91's BMP sources passes and a changed pixel does not. Each image lands in data_root/<set>/ as PNG,
whole or not at all; what is already there and correct is kept, so a second run downloads nothing.
"""
import csv
import hashlib
import io
import logging
import os
import shutil
import sys
import tempfile
from collections import namedtuple

import numpy as np
from PIL import Image
from skimage import data
from tqdm import tqdm

import config
import system
from dataset import DataError, open_image

# skimage.data photographs that ship with the package (no network needed); gray ones test the RGB path.
DEMO_TRAIN = ("chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
              "grass", "gravel", "brick", "moon", "coins")
DEMO_EVAL = ("astronaut", "coffee", "camera")
MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standard_sets.tsv")
StandardFile = namedtuple("StandardFile", "set file url_path bytes sha256 size pixels_sha256")
RETRIES = 2  # pooch downloads a file up to 1 + RETRIES times (a dropped connection, a bad transfer)


class FetchError(RuntimeError):
    """A standard file that could not be fetched or did not check out; its message is one line."""


def load_photo(name):
    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def write_demo_set(names, folder):
    """Write each skimage photo as PNG unless an identical file is already there; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        path = os.path.join(folder, f"{name}.png")
        pixels = np.ascontiguousarray(load_photo(name))
        if not _same_pixels(path, pixels):
            with system.failed_writes_exit(path), system.replaced_whole(path) as temporary:
                Image.fromarray(pixels).save(temporary, format="PNG")
        paths.append(path)
    return paths


def _same_pixels(path, pixels):
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as existing:
            return np.array_equal(np.asarray(existing), pixels)
    except OSError:
        return False


def read_manifest(sets):
    """The manifest's files of `sets` (names as in its first column), in its order."""
    with open(MANIFEST, newline="") as f:
        files = [StandardFile(**row) for row in csv.DictReader(f, delimiter="\t")]
    known = sorted({file.set for file in files})
    unknown = [name for name in sets if name not in known]
    if not sets:
        raise SystemExit(f"config error: sets= names no set; the standard sets: {', '.join(known)}")
    if unknown:
        raise SystemExit(f"config error: sets={','.join(sets)}: unknown set {unknown[0]!r}; "
                         f"the standard sets: {', '.join(known)}")
    return [file for file in files if file.set in sets]


def pixels_sha256(source):
    """(WxH, SHA-256 of mode, size and pixel bytes) of an image file or bytes: the same for a BMP and its PNG copy.
    The size is read from the header first, so a file claiming a huge image is refused before it is decoded."""
    with open_image(io.BytesIO(source) if isinstance(source, bytes) else source) as pil:
        digest = hashlib.sha256(f"{pil.mode} {pil.size[0]}x{pil.size[1]}\n".encode())
        digest.update(pil.tobytes())
        return f"{pil.size[0]}x{pil.size[1]}", digest.hexdigest()


def is_checked(path, file):
    """Whether `path` holds the image of `file`, by its pixels."""
    try:
        return os.path.isfile(path) and pixels_sha256(path) == (file.size, file.pixels_sha256)
    except DataError:
        return False


def as_png(content):
    """The file's bytes as PNG: a PNG as it is (byte-identical to its source), another format converted."""
    if content.startswith(b"\x89PNG\r\n\x1a\n"):
        return content
    with Image.open(io.BytesIO(content)) as pil:
        out = io.BytesIO()
        pil.save(out, format="PNG")
        return out.getvalue()


def from_folder(source, file):
    """(path, bytes) of `file` in a local copy laid out like data_root (<source>/<set>/<file>, or the source's own
    name: T91/t1.bmp); checked_png checks them."""
    path = os.path.join(source, file.set, file.file)
    if not os.path.isfile(path):  # a source file as downloaded by hand, e.g. T91/t1.bmp
        path = os.path.join(source, file.set, os.path.basename(file.url_path))
    if not os.path.isfile(path):
        raise FetchError(f"{os.path.join(source, file.set, file.file)}: no such file in source={source} "
                         f"(expected <source>/<set>/{file.file} or {os.path.basename(file.url_path)})")
    with open(path, "rb") as f:
        return path, f.read()


def from_network(downloads, file):
    """(URL, bytes) of `file` downloaded by pooch into `downloads`, which keeps them only when their SHA-256 is the
    pinned one (and retries a failed transfer)."""
    import requests

    url = f"{downloads.base_url}{file.url_path}"
    try:
        path = downloads.fetch(file.url_path)
    except requests.exceptions.HTTPError as err:
        raise FetchError(f"{url}: the server answered {err.response.status_code} {err.response.reason}") from None
    except requests.exceptions.ConnectionError as err:
        raise FetchError(f"{url}: cannot connect ({type(err).__name__}); without internet, use source=FOLDER with a "
                         "copy of the sets, or download the files that code/standard_sets.tsv lists by hand "
                         "(data/README.md)") from None
    except requests.exceptions.RequestException as err:  # a transfer cut off midway (ChunkedEncodingError), a timeout
        raise FetchError(f"{url}: the download failed {1 + RETRIES} times ({type(err).__name__}); "
                         "run again to retry") from None
    except ValueError as err:  # pooch: the bytes' SHA-256 is not the pinned one (the file is not kept)
        raise FetchError(f"{url}: {' '.join(str(err).split())}") from None
    except OSError as err:  # writing the download: a full disk or quota (requests' errors, OSErrors too, are above)
        data_root = os.path.dirname(str(downloads.abspath))  # where to free space: the download itself is removed
        raise SystemExit(system.write_failure(data_root, err)) from None
    with open(path, "rb") as f:
        content = f.read()
    os.remove(path)  # the PNG in data_root/<set>/ is what is kept
    return url, content


def checked_png(origin, content, file):
    """The image of `file` as PNG bytes, refused unless its pixels are the pinned ones (`origin`: where the bytes
    came from, for the message)."""
    try:
        png = as_png(content)
        checked = pixels_sha256(png)  # what is written is what is checked
    except (OSError, DataError) as err:
        raise FetchError(f"{origin}: not a readable image ({err}); not kept") from None
    if checked != (file.size, file.pixels_sha256):
        raise FetchError(f"{origin}: not the pinned image of {file.set}/{file.file} (pixels {checked[0]} SHA-256 "
                         f"{checked[1][:12]}…, expected {file.size} {file.pixels_sha256[:12]}…); not kept")
    return png


def fetch_standard(cfg):
    """Bring the standard sets into cfg['data_root']; returns ({set: number of images}, how many were fetched)."""
    files = read_manifest([name for name in cfg["sets"].split(",") if name])
    if cfg["source"] and not os.path.isdir(cfg["source"]):
        raise FetchError(f"source={cfg['source']}: no such folder (a copy of the sets laid out as <source>/<set>/*.png)")
    system.check_writable(cfg["data_root"])
    downloads = None
    if not cfg["source"]:
        import pooch  # only for a download

        logging.getLogger("pooch").setLevel(logging.WARNING)  # one progress bar, not a line per file
        with system.failed_writes_exit(cfg["data_root"]):  # this process's own folder: a second one has another
            folder = tempfile.mkdtemp(prefix=".downloads", dir=cfg["data_root"])
        downloads = pooch.create(path=folder, base_url=f"{cfg['data_url']}/",
                                 registry={file.url_path: f"sha256:{file.sha256}" for file in files},
                                 retry_if_failed=RETRIES)
    counts, fetched = {}, 0
    try:
        for file in tqdm(files, desc="standard sets", unit="image", dynamic_ncols=True):
            target = os.path.join(cfg["data_root"], file.set, file.file)
            counts[file.set] = counts.get(file.set, 0) + 1
            if is_checked(target, file):
                continue
            origin, content = from_folder(cfg["source"], file) if cfg["source"] else from_network(downloads, file)
            png = checked_png(origin, content, file)
            with system.failed_writes_exit(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            system.write_file(target, png)
            fetched += 1
    finally:
        if downloads is not None:  # each download is removed once its PNG is written: only empty folders are left
            shutil.rmtree(downloads.abspath, ignore_errors=True)
    return counts, fetched


def main(argv):
    if argv[:1] == ["standard"]:
        cfg = config.from_argv(argv[1:], ("standard",))
        try:
            counts, fetched = fetch_standard(cfg)
        except FetchError as err:
            raise SystemExit(f"error: {err}") from None
        where = f"from {cfg['source']}" if cfg["source"] else f"from {cfg['data_url']}"
        print(f" * {cfg['data_root']}: " + ", ".join(f"{name} {n}" for name, n in counts.items())
              + f" images checked; {fetched} new ({where}), {sum(counts.values()) - fetched} already there")
        return counts
    cfg = config.from_argv(argv, ("data",))
    for names, folder in ((DEMO_TRAIN, cfg["data_dir"]), (DEMO_EVAL, cfg["eval_dir"])):
        paths = write_demo_set(names, folder)
        print(f" * {folder}: {len(paths)} images from skimage.data ({', '.join(names)})")


if __name__ == "__main__":
    main(sys.argv[1:])
