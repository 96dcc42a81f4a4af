"""A comparison page of checkpoints on an eval folder, to judge results by eye (pages.py writes it): for each image
a slider between any two methods (HR, the LR input, bilinear, bicubic, each checkpoint) with synchronised zoom and
pan, and each method's PSNR / SSIM for that image. One static folder that opens from file://.

    python code/compare.py checkpoint=checkpoints/demo/model.pt          # data/eval -> runs/compare_eval_bilinear/
    python code/compare.py checkpoint=a.pt,b.pt eval_dir=data/Set5 degradation=bicubic_matlab out=runs/set5
    python code/compare.py checkpoint=... eval_dir=data/B100 crop=192     # 192x192 crops: a small page

On the page: drag the white line or press <- / -> to move the split, wheel or + / - to zoom, drag the image to
pan, 0 fits the image, f returns to the first view, n / p (PageDown / PageUp) step through the images. The first
view of each image is the square where the best model gains most over bicubic. upscale.py page=FOLDER writes
the same page for one's own photos (input | bicubic | model).
"""
import os
import sys

import config
import system
from checkpoints import CheckpointError, load_models, method_names
from dataset import DataError, SRDataset, set_label
from pages import PageError, check_out, method_images, write_page


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "ckpt_dir", "eval_dir", "scale", "degradation", "reading", "out",
                                  "runs_dir", "compare", "device"))
    device = system.pick_device(cfg["device"])
    eval_name = set_label(cfg["eval_dir"])
    out = cfg["out"] or os.path.join(cfg["runs_dir"], f"compare_{eval_name}_{cfg['degradation']}")
    title = f"x{cfg['scale']} on {eval_name}, LR made by {cfg['degradation']} downscaling"
    try:
        check_out(out)
        loaded = load_models(cfg, device)
        models = [(name, model) for name, (_, model, _) in zip(method_names(loaded), loaded)]
        dataset = SRDataset.from_config(cfg, train=False, stream=True)  # decoded image by image, as the page is written
        page = write_page(out, title, method_images(dataset, models, device, cfg["crop"]))
    except (CheckpointError, DataError, PageError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {page}")
    return page


if __name__ == "__main__":
    main(sys.argv[1:])
