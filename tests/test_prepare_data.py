import os

import numpy as np
from PIL import Image

import prepare_data
from dataset import SRDataset


def test_embedded_data_is_real_photos_and_reruns_leave_files_alone(tmp_path, capsys):
    args = [f"data_dir={tmp_path / 'train'}", f"eval_dir={tmp_path / 'eval'}"]
    prepare_data.main(args)
    train = sorted(os.listdir(tmp_path / "train"))
    evals = sorted(os.listdir(tmp_path / "eval"))
    assert len(train) == len(prepare_data.TRAIN) and len(evals) == len(prepare_data.EVAL)
    assert not set(train) & set(evals)
    astronaut = np.asarray(Image.open(tmp_path / "eval" / "astronaut.png"))
    assert astronaut.shape == (512, 512, 3) and astronaut.std() > 30  # a photograph, not a flat image
    stamps = {name: os.stat(tmp_path / "train" / name).st_mtime_ns for name in train}
    prepare_data.main(args)
    assert stamps == {name: os.stat(tmp_path / "train" / name).st_mtime_ns for name in train}
    assert len(SRDataset(str(tmp_path / "train"))) == len(train)  # every photo is large enough to crop
