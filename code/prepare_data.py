"""Build the embedded default dataset from real photographs that scikit-image ships.

    python code/prepare_data.py     # writes data/train/*.png and data/eval/*.png

Nothing is downloaded and nothing is committed: the photos come from the installed package.
It is small (a demo, not a benchmark); for real experiments point data_dir / eval_dir at
any folder of images, e.g. ../shared/data/T91 and ../shared/data/Set5.
"""
import os
import sys

import numpy as np
from PIL import Image
from skimage import data

# skimage.data photographs that ship with the package (no network needed); gray ones test the RGB path.
TRAIN = ("chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle_left",
         "grass", "gravel", "brick", "moon", "coins")
EVAL = ("astronaut", "coffee", "camera")


def load_photo(name):
    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def write_set(names, folder):
    """Write each photo as PNG unless an identical file is already there; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        path = os.path.join(folder, f"{name}.png")
        pixels = np.ascontiguousarray(load_photo(name))
        if not _same_pixels(path, pixels):
            Image.fromarray(pixels).save(path)
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


def main(argv):
    import config

    cfg = config.from_argv(argv, ("data",))
    for names, folder in ((TRAIN, cfg["data_dir"]), (EVAL, cfg["eval_dir"])):
        paths = write_set(names, folder)
        print(f" * {folder}: {len(paths)} images from skimage.data ({', '.join(names)})")


if __name__ == "__main__":
    main(sys.argv[1:])
