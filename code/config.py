"""One small config dict shared by every script, overridden with `key=value` arguments.

    python code/train.py run=my_residual model=residual lr=1e-3 max_steps=5000

Each value is parsed with the type of its default, so a typo or a wrong type is caught
before any work starts, with a one-line message that lists the valid keys.
"""
import difflib
import json
import math
import os
import re

import system

# Where the standard sets are, as <DATA_ROOT>/T91, .../Set5 (`prepare_data.py standard` puts them there): the folder
# that experiments.py and report.py read; the environment variable SR_DATA_ROOT points them at another copy.
DATA_ROOT = os.environ.get("SR_DATA_ROOT", "data")
# The keys by section; each script takes the keys of the sections it uses (and --help lists them), so that a key
# another script reads (upscale.py out=... instead of output=...) is an error, not silently ignored.
SECTIONS = {
    "run": {"run": "demo", "runs_dir": "runs", "ckpt_dir": "checkpoints"},  # outputs: runs/<run>/, checkpoints/<run>/
    "data": {  # any folder of images; the defaults are built from skimage.data by code/prepare_data.py
        "data_dir": "data/train",  # one folder, or several separated by commas (T91,BSD200: the 291 images)
        "eval_dir": "data/eval", "scale": 2,
        "patch_size": 64,  # side of the HR training crop
        "jitter": 0.2,  # ColorJitter brightness = contrast = saturation = hue
        "degradation": "bilinear",  # how LR is made: bilinear | bicubic | nearest | nearest_last | box | bicubic_matlab
        "augment": "none",  # none | dihedral: each HR crop also randomly flipped and turned by 90 degrees
        "scale_augment": "",  # e.g. 0.9,0.8,0.7,0.6: training also on each image downscaled by these; empty = none
    },
    "standard": {  # prepare_data.py standard: the sets of the SR papers, checked against code/standard_sets.tsv
        "data_root": DATA_ROOT, "sets": "T91,BSD200,Set5,Set14,B100",
        "source": "",  # a local copy laid out like data_root (<source>/<set>/*.png) instead of the download
        "data_url": "https://raw.githubusercontent.com",  # where the manifest's <repository>/<commit>/<path> are
    },
    "reading": {  # every reader of images
        "bad_files": "error",  # error | skip: what an unreadable or too small image in a data folder does
        "max_pixels": 100_000_000,  # larger images are refused from their header, before decoding (memory)
    },
    "model": {"model": "basic", "num_blocks": 10, "channels": 64},  # model: basic | residual (+ bilinear upsampling)
    "training": {
        "batch_size": 16, "lr": 1e-4, "max_steps": 20000, "seed": 0,
        "loss": "l1",  # l1 (the handout's) | l2 (mean squared error: what PSNR measures)
        "loss_border": 0,  # HR pixels at each edge of a crop left out of the loss (they see the crop's zero padding)
        "loss_channels": "rgb",  # rgb | y: the loss on the three channels, or on luma only (what the SR tables score)
        "lr_schedule": "constant",  # constant | cosine: warm-up, then cosine decay from lr to lr_min at max_steps
        "warmup_steps": 0,  # cosine only: steps of linear warm-up from 0 to lr
        "lr_min": 0.0,  # cosine only: the learning rate at max_steps
        "ema": 0.0,  # decay of a moving average of the weights (e.g. 0.999), validated and saved; 0 = off
        "log_every": 10, "val_every": 500, "ckpt_every": 1000,  # in steps
        "save_model_at": 0,  # also keep the weights of this step as model_<step>.pt (a fine-tune's start); 0 = none
        "resume": "never",  # never | auto: continue from the newest good checkpoints/<run>/step*.pt
        "overwrite": False,  # allow starting over in an existing run folder
    },
    "gan": {  # Task 6: gan=true trains the model as a GAN generator
        "gan": False, "init": "",  # init: checkpoint whose weights start the model, e.g. checkpoints/residual/model.pt
        "adv_weight": 0.01,  # weight of the adversarial loss beside the L1 content loss (weight 1)
        "gan_loss": "relativistic",  # relativistic (ESRGAN's RaGAN) | standard (SRGAN's BCE)
        "fm_weight": 0.0,  # weight of feature matching (L1 between D's features of HR and of the prediction); 0 = off
        "disc_channels": 32,  # the discriminator's first width (doubled at each of its 4 stages)
        "disc_norm": "none",  # none | spectral: spectral normalisation of the discriminator's layers
    },
    "system": {  # what system.py decides with them
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "channels_last": "auto",  # auto | on | off: NHWC layout; auto = on for CUDA and AVX-512 CPUs
        "data_on_device": "auto",  # auto | on | off: batches made batch-wise (batches.DeviceBatches)
        "amp": "auto",  # auto | off | bf16: bf16 autocast; auto = where the hardware computes in bf16
        "num_workers": -1,  # DataLoader workers; -1 = auto: 0 on a CPU, 4 with CUDA
        "malloc": "tuned",  # tuned | default: glibc keeps freed memory for reuse (system.tune_malloc)
    },
    "checkpoint": {"checkpoint": ""},  # checkpoint file(s); evaluate.py: comma-separated, empty = checkpoints/*/model.pt
    "evaluate": {
        "protocol": "rgb",  # rgb (RGB in [0, 1], `degradation`) | standard (MATLAB bicubic, Y, shaved border)
        "out": "",  # evaluate.py: the tables' path without extension, empty = runs/eval_<set>_<degradation>
        # compare.py: the page's folder, empty = runs/compare_<set>_<degradation>; export.py: the ONNX file, empty =
        # <the checkpoint's folder name>.onnx, e.g. final.onnx
    },
    "upscale": {
        "input": "", "output": "",  # an image or a folder; output empty = beside the input, *_x2.png (x<scale>)
        "tile": 256,  # LR pixels per tile side
        "overlap": 0,  # LR pixels of context around each tile; 0 = the model's receptive field
        "ensemble": False,  # x8 geometric self-ensemble (flips and rotations)
        "onnxruntime": True,  # on a CPU, run the model with onnxruntime (faster than PyTorch there); false = PyTorch
        "page": "",  # a folder for the comparison page (input | bicubic | model) of the upscaled images; empty = none
    },
    "compare": {"crop": 0},  # compare.py: HR px a side of the crop around each image's first view; 0 = whole images
    "report": {"report_dir": ""},  # report.py's output folder; empty = runs/report
    "bench": {"bench_steps": 24},  # timed steps per measurement (a multiple of 8: see bench.py)
}
DEFAULTS = {key: value for section in SECTIONS.values() for key, value in section.items()}

CHOICES = {
    "degradation": ("bilinear", "bicubic", "nearest", "nearest_last", "box", "bicubic_matlab"), "augment": ("none", "dihedral"),
    "bad_files": ("error", "skip"), "model": ("basic", "residual"), "lr_schedule": ("constant", "cosine"),
    "resume": ("never", "auto"), "loss": ("l1", "l2"), "loss_channels": ("rgb", "y"),
    "gan_loss": ("relativistic", "standard"), "disc_norm": ("none", "spectral"), "channels_last": ("auto", "on", "off"),
    "data_on_device": ("auto", "on", "off"), "amp": ("auto", "off", "bf16"), "malloc": ("tuned", "default"),
    "protocol": ("rgb", "standard"),
}
POSITIVE = ("max_pixels", "scale", "patch_size", "num_blocks", "channels", "batch_size", "max_steps",
            "log_every", "val_every", "ckpt_every", "lr", "tile", "bench_steps", "disc_channels")


class ConfigError(ValueError):
    """A bad key or value; its message is meant to be printed as one line."""


def _parse_value(key, text, default):
    if isinstance(default, bool):  # before int: bool is a subclass of int
        words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
        if text.strip().lower() not in words:
            raise ConfigError(f"{key}={text!r}: expected true or false")
        return words[text.strip().lower()]
    if isinstance(default, (int, float)):
        try:
            value = type(default)(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected {type(default).__name__}") from None
        if isinstance(value, float) and value != value:
            raise ConfigError(f"{key}={text!r}: expected a number")
        return value
    return text


def parse_overrides(args, defaults=DEFAULTS):
    """Return a copy of `defaults` updated by `key=value` strings, parsed and validated."""
    cfg = dict(defaults)
    for arg in args:
        key, sep, text = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {arg!r}; valid keys: {', '.join(defaults)}")
        if key not in defaults:
            raise ConfigError(f"unknown key {key!r}{did_you_mean(key, defaults)}; valid keys: {', '.join(defaults)}")
        cfg[key] = _parse_value(key, text, defaults[key])
    validate(cfg)
    return cfg


def scale_factors(text):
    """The factors of a valid scale_augment value ("0.9,0.8" -> (0.9, 0.8); empty -> ())."""
    return tuple(float(factor) for factor in text.split(",")) if text else ()


def did_you_mean(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {close[0]}=?)" if close else ""


def script_keys(sections):
    """The keys a script takes: those of its `sections`; a name that is not a section is a single key."""
    return [key for name in sections for key in (SECTIONS[name] if name in SECTIONS else (name,))]


def check_script_keys(args, sections):
    """A key=value that the script does not read is refused, naming the keys it does read."""
    keys = script_keys(sections)
    for arg in args:
        key = arg.partition("=")[0]
        if key in DEFAULTS and key not in keys:
            raise ConfigError(f"{key}= is not a setting of this script{did_you_mean(key, keys)}; "
                              f"its keys: {', '.join(keys)}")


def validate(cfg):
    """Check values that are well-typed but still unusable, before any work starts."""
    def require(ok, message):
        if not ok:
            raise ConfigError(message)

    for key in POSITIVE:
        require(cfg[key] > 0, f"{key}={cfg[key]}: must be positive")
    for key in ("seed", "overlap", "adv_weight", "fm_weight", "warmup_steps", "lr_min", "loss_border", "crop",
                "save_model_at"):
        require(cfg[key] >= 0, f"{key}={cfg[key]}: must not be negative")
    try:
        factors = scale_factors(cfg["scale_augment"])
    except ValueError:
        factors = (math.nan,)  # not a number: refused below
    require(all(0 < factor < 1 for factor in factors) and len(set(factors)) == len(factors),
            f"scale_augment={cfg['scale_augment']!r}: expected different factors between 0 and 1, comma-separated "
            "(0.9,0.8)")
    for key, allowed in CHOICES.items():
        require(cfg[key] in allowed, f"{key}={cfg[key]!r}: expected one of {', '.join(allowed)}")
    require(cfg["num_workers"] >= -1, f"num_workers={cfg['num_workers']}: must be -1 (auto) or more")
    require(0 <= cfg["ema"] < 1, f"ema={cfg['ema']}: must be in [0, 1) (0 = off)")
    require(cfg["lr_min"] <= cfg["lr"], f"lr_min={cfg['lr_min']} is above lr={cfg['lr']}")
    require(0 <= cfg["jitter"] <= 0.5, f"jitter={cfg['jitter']}: must be in [0, 0.5] (ColorJitter's hue limit)")
    require(cfg["run"] and "/" not in cfg["run"] and not cfg["run"].startswith("."),
            f"run={cfg['run']!r}: must be a plain folder name")
    require(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", cfg["device"]) is not None,
            f"device={cfg['device']!r}: expected auto, cpu, cuda or cuda:N")


def validate_training(cfg):
    """What only training needs: an HR crop that the scale divides (evaluation works at any scale)."""
    if cfg["patch_size"] % cfg["scale"]:
        raise ConfigError(f"patch_size={cfg['patch_size']} is not divisible by scale={cfg['scale']}")
    if cfg["save_model_at"] > cfg["max_steps"]:
        raise ConfigError(f"save_model_at={cfg['save_model_at']}: after max_steps={cfg['max_steps']}, never reached")
    if cfg["gan"] and (cfg["loss"], cfg["loss_channels"]) != ("l1", "rgb"):
        raise ConfigError(f"loss={cfg['loss']} loss_channels={cfg['loss_channels']} with gan=true: the GAN's content "
                          "loss is L1 on RGB")
    if 2 * cfg["loss_border"] >= cfg["patch_size"]:
        raise ConfigError(f"loss_border={cfg['loss_border']} leaves no pixel of the {cfg['patch_size']}x"
                          f"{cfg['patch_size']} crop in the loss")


def from_argv(argv, sections=tuple(SECTIONS), training=False):
    """Parse a script's command line, which may set the keys of the script's `sections` (see script_keys); print
    a one-line error and exit on bad input. --help lists those keys with their defaults."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: key=value ...  (defaults below)")
        for name in sections:
            print(f"  {name}: " + ", ".join(f"{key}={DEFAULTS[key]}" for key in script_keys((name,))))
        raise SystemExit(0)
    try:
        cfg = parse_overrides(argv)
        check_script_keys(argv, sections)
        if training:
            validate_training(cfg)
        return cfg
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None


def save(cfg, folder):
    """Write the resolved config as JSON beside a run's outputs, so a result says how it was made."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.json")
    system.write_file(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
