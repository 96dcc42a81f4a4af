"""Task 1: SRDataset, which makes (low-res, high-res) pairs from a folder of ordinary images, and the image
reading every script shares (`decode_image`: size checked from the header first, EXIF orientation applied).

The HR image is a random 64x64 crop with colour jitter (and optionally one of the 8 flips/rotations); the
LR image is made from it by `degrade`, the one place where the degradation lives, so LR and HR always
correspond. batches.py makes the same samples a whole batch at a time.

    python code/dataset.py [data_dir=...]   # the handout's data-loader check
"""
import collections.abc
import contextlib
import functools
import math
import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.io import ImageReadMode

import system
from config import DEFAULTS, scale_factors

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
MAX_PIXELS = DEFAULTS["max_pixels"]  # larger images are refused from their header, before decoding
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
Image.MAX_IMAGE_PIXELS = None  # the size limit is open_image's, with its own one-line message
MIN_EVAL_SIZE = 11  # pixels of the LR image: SSIM's window
INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


class DataError(ValueError):
    """A missing folder or an unreadable image; the message names it in one line."""


def set_names(folders):
    """The sets' names of a folder setting ("/scratch/sets/T91,data/BSD200" -> ["T91", "BSD200"]): what tables,
    file names and a resumed run's check call them, wherever the folders are."""
    return [os.path.basename(os.path.normpath(folder)) for folder in folders.split(",") if folder]


def set_label(folders):
    """What tables and pages of several sets are named: "Set5+Set14" for data/Set5,data/Set14."""
    return "+".join(set_names(folders))


def list_images(folder):
    """Sorted image files of `folder`; hidden files, folders and non-images (README, Thumbs.db) are ignored.
    A broken link named like an image stays in the list, so that reading it says what is wrong.
    Several folders separated by commas (T91,BSD200) give the files of each in turn."""
    if "," in folder:
        return [path for part in folder.split(",") for path in list_images(part)]
    if not os.path.isdir(folder):
        if os.path.exists(folder):  # e.g. one image given where its folder was meant
            raise DataError(f"{folder}: is a file, not a folder; a folder of images is wanted here")
        raise DataError(f"{folder}: no such folder")
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
                   and not os.path.isdir(os.path.join(folder, n)))
    if not names:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


@contextlib.contextmanager
def open_image(path, max_pixels=MAX_PIXELS):
    """Pillow's lazy view of an image file, its size checked against `max_pixels` from the header alone (a
    small file can claim a huge image: a decompression bomb). Nothing is decoded yet."""
    try:
        with Image.open(path) as pil:
            width, height = pil.size
            if width * height > max_pixels:
                raise DataError(f"{path}: {width}x{height} px ({width * height / 1e6:.0f} megapixels) is above "
                                f"max_pixels={max_pixels}; raise max_pixels to read it")
            yield pil
    except DataError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({str(err).strip() or type(err).__name__})") from None


def decode_image(path, keep_gray=False, max_pixels=MAX_PIXELS):
    """Decode to a 3xHxW uint8 (uint16 for 16-bit and float files) tensor, the right way up (EXIF orientation
    applied, as viewers show it); 1xHxW for a grayscale file if keep_gray. Of an animated image, the first frame.

    torchvision decodes PNG and JPEG (gray, palette, RGBA and CMYK become RGB); Pillow the rest.
    """
    with open_image(path, max_pixels) as pil:
        gray = pil.mode in GRAY_MODES
        if pil.format in ("PNG", "JPEG") and not getattr(pil, "is_animated", False):
            try:
                image = torchvision.io.read_image(path, ImageReadMode.RGB, apply_exif_orientation=True)
            except (RuntimeError, ValueError):  # what torchvision cannot decode, Pillow may
                image = _decode_with_pillow(pil)
        else:
            image = _decode_with_pillow(pil)
    return image[:1] if keep_gray and gray else image


def _decode_with_pillow(pil):
    pil.seek(0)  # an animation's first frame
    pil = ImageOps.exif_transpose(pil)
    if pil.mode == "F":  # 32-bit float, e.g. a TIFF: values must be in [0, 1]
        array = np.asarray(pil, dtype=np.float32)
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"float image with values in [{array.min():g}, {array.max():g}], expected [0, 1]")
        array = np.rint(array * 65535).astype(np.uint16)
        return torch.from_numpy(array)[None].expand(3, -1, -1).contiguous()
    if pil.mode.startswith("I"):  # 16/32-bit integer grayscale
        array = np.asarray(pil, dtype=np.int32).clip(0, 65535).astype(np.uint16)
        return torch.from_numpy(array)[None].expand(3, -1, -1).contiguous()
    return torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def to_float(image):
    return transforms.functional.convert_image_dtype(image, torch.float32)


def degrade(hr, scale=2, method="bilinear"):
    """Make the LR image: resize HR (CxHxW or NxCxHxW) down by `scale` with `method`. The one place to change
    the degradation. Every method here is deterministic; a random one (noise, blur of random width) would draw
    from torch's global generator, which SRDataset seeds per sample around this call, while the batch-wise
    path (batches.DeviceBatches) would need its draws added to batches.SampleParameters.

    bilinear / bicubic / nearest: torchvision's Resize (antialiased; nearest keeps the first, top-left pixel of
    each scale x scale block, half an HR pixel off the block's centre). bicubic_matlab: MATLAB's `imresize`, the
    degradation of the published SR benchmarks, rounded to 8 bits as they are. The two controls of nearest, for
    README.pdf's downscaling table: nearest_last keeps each block's last, bottom-right pixel (no blur either, the opposite
    shift) and box is the block's mean (aligned with the block's centre, as bilinear is, with a milder blur).
    """
    if method == "bicubic_matlab":
        return imresize_matlab(hr, 1 / scale).mul(255).round().clamp(0, 255).div(255).to(hr.dtype)
    height, width = hr.shape[-2] // scale, hr.shape[-1] // scale
    if method == "nearest_last":
        return hr[..., scale - 1:height * scale:scale, scale - 1:width * scale:scale].clone()  # not a view of hr
    if method == "box":
        return torch.nn.functional.avg_pool2d(hr[..., :height * scale, :width * scale], scale)
    return transforms.functional.resize(hr, [height, width], INTERPOLATION[method], antialias=True)


def _cubic(x):
    """Keys' cubic convolution kernel with a = -0.5, as in MATLAB."""
    x = x.abs()
    return ((1.5 * x ** 3 - 2.5 * x ** 2 + 1) * (x <= 1)
            + (-0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2) * ((x > 1) & (x <= 2)))


def _resize_matrix(in_length, out_length, scale):
    """The (out x in) matrix of MATLAB imresize's bicubic weights along one dimension.

    Same sample positions as MATLAB, the kernel widened by 1/scale when shrinking (antialiasing),
    weights normalised per output pixel, and samples beyond the border mirrored (symmetric padding).
    """
    width = 4.0 / scale if scale < 1 else 4.0
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    center = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(center - width / 2)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]  # 1-based, may fall outside
    distance = center[:, None] - indices
    weights = scale * _cubic(scale * distance) if scale < 1 else _cubic(distance)
    weights = weights / weights.sum(dim=1, keepdim=True)
    mirrored = torch.cat([torch.arange(in_length), torch.arange(in_length - 1, -1, -1)])
    columns = mirrored[(indices.long() - 1) % (2 * in_length)]
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, columns, weights)
    return matrix


def _resize_matrix_on(in_length, out_length, scale, device):
    """_resize_matrix on `device`, kept for the small sizes that training resizes at every step (no
    host-to-device copy per batch on a GPU); large one-off evaluation sizes are not kept."""
    if in_length * out_length > 1 << 16:
        return _resize_matrix(in_length, out_length, scale).to(device)
    return _cached_resize_matrix(in_length, out_length, scale, device)


@functools.lru_cache(maxsize=32)
def _cached_resize_matrix(in_length, out_length, scale, device):
    return _resize_matrix(in_length, out_length, scale).to(device)


def imresize_matlab(image, scale):
    """MATLAB's `imresize(image, scale)` (bicubic, antialiased) for a CxHxW or NxCxHxW float tensor.

    Computed in float64, height first as MATLAB does for equal scales; not rounded.
    """
    height, width = image.shape[-2:]
    out_height, out_width = (math.ceil(side * scale - 1e-9) for side in (height, width))  # 255 * (1/3) is 85
    rows = _resize_matrix_on(height, out_height, scale, image.device)
    cols = _resize_matrix_on(width, out_width, scale, image.device)
    return (rows @ image.double() @ cols.T).to(image.dtype)


def crop_to_multiple(image, scale):
    """Crop the bottom/right so both sides are multiples of `scale` (LR and HR then align exactly)."""
    height, width = image.shape[-2] // scale * scale, image.shape[-1] // scale * scale
    return image[..., :height, :width]


class SRDataset(Dataset):
    """Pairs (lr, hr) from every image of `folder`.

    train=True: a random `patch_size` crop, colour-jittered, as HR. An index may also be an
    (index, seed) pair, as `TrainSampler` yields: the crop and jitter are then drawn from that
    seed, so a sample depends on nothing else and a resumed run sees the same data.
    train=False: the whole image (cropped to a multiple of `scale`) with a deterministic LR.

    Every image is decoded once, here, and kept in memory (uint8, 3 bytes a pixel; DataLoader
    workers share it): a broken file is found before any work, and a 64x64 crop does not pay for
    decoding a whole photo. With stream=True (evaluation) each is checked here but decoded again when
    it is used (`FolderImages`), so that memory holds one image, not the set. bad_files="error" stops at
    the first unusable file; "skip" leaves it out with a one-line warning. downscaled: factors by which each
    training image is also added downscaled (config's scale_augment; `with_downscaled_copies`).
    """

    def __init__(self, folder, patch_size=64, scale=2, jitter=0.2, degradation="bilinear", train=True,
                 bad_files="error", augment="none", max_pixels=MAX_PIXELS, stream=False, downscaled=()):
        self.scale, self.degradation, self.train, self.augment = scale, degradation, train, augment
        # crop while still 8-bit, so only the patch is converted to float
        steps = [transforms.RandomCrop(patch_size), transforms.ConvertImageDtype(torch.float32)]
        if jitter > 0:
            steps.append(transforms.ColorJitter(jitter, jitter, jitter, jitter))
        self.transform = transforms.Compose(steps)
        # whole eval images must still leave SSIM's 11x11 window room after downscaling
        self.files, self.images = read_folder(folder, patch_size if train else MIN_EVAL_SIZE * scale,
                                              "training" if train else "evaluation", scale, bad_files, max_pixels,
                                              stream=stream)
        if train and downscaled:
            self.files, self.images = with_downscaled_copies(self.files, self.images, downscaled, patch_size)
        self.sizes = self.images.sizes if stream else [tuple(image.shape[-2:]) for image in self.images]

    @classmethod
    def from_config(cls, cfg, train=True, stream=False):
        """The training set (data_dir) or the validation set (eval_dir) that a config describes."""
        if train:
            return cls(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"], cfg["degradation"],
                       bad_files=cfg["bad_files"], augment=cfg["augment"], max_pixels=cfg["max_pixels"],
                       downscaled=scale_factors(cfg["scale_augment"]))
        return cls(cfg["eval_dir"], scale=cfg["scale"], degradation=cfg["degradation"], train=False,
                   bad_files=cfg["bad_files"], max_pixels=cfg["max_pixels"], stream=stream)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        image = self.images[index]
        if not self.train:
            hr = to_float(crop_to_multiple(image, self.scale))
            return degrade(hr, self.scale, self.degradation), hr
        with seeded(seed) if seed is not None else contextlib.nullcontext():
            hr = self.transform(image)
            if self.augment == "dihedral":  # drawn after the crop and jitter, so they stay as without it
                hr = dihedral(hr, int(torch.randint(8, ())))
            return degrade(hr, self.scale, self.degradation), hr


def with_downscaled_copies(files, images, factors, minimum):
    """The images and, after them, each one downscaled by each factor (MATLAB imresize, antialiased, rounded to
    its bit depth): the same photographs with more detail a pixel, as the 291 images were augmented for VDSR and
    DRRN. A copy under `minimum` px a side (the crop) is left out. Copies are named '<file> (x<factor>)'."""
    all_files, all_images = list(files), list(images)
    for factor in factors:
        for path, image in zip(files, images):
            peak = torch.iinfo(image.dtype).max
            small = imresize_matlab(image.double() / peak, factor).mul(peak).round().clamp(0, peak)
            if min(small.shape[-2:]) < minimum:
                continue
            all_files.append(f"{path} (x{factor:g})")
            all_images.append(small.to(image.dtype))
    return all_files, all_images


def dihedral(images, k):
    """The k-th of the 8 symmetries of the square (k = 0..7): k % 4 quarter turns, then a mirror if k >= 4.
    Natural images look as plausible turned or mirrored, so this multiplies the distinct training crops
    by 8 (EDSR's augmentation)."""
    images = torch.rot90(images, k % 4, dims=(-2, -1))
    return images.flip(-1) if k >= 4 else images


class FolderImages(collections.abc.Sequence):
    """Checked image files, decoded again each time one is read instead of held: evaluation memory then holds
    one image at a time whatever the number of images, for a decoding per use.
    `sizes`: the (height, width) of each, as decoded."""

    def __init__(self, files, sizes, keep_gray, max_pixels):
        self.files, self.sizes, self.keep_gray, self.max_pixels = files, sizes, keep_gray, max_pixels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            return decode_image(self.files[index], self.keep_gray, self.max_pixels)
        except DataError as err:  # changed since it was checked
            raise DataError(f"{err} (it was readable when the folder was read)") from None


def read_folder(folder, minimum, purpose, scale=2, bad_files="error", max_pixels=MAX_PIXELS, keep_gray=False,
                stream=False):
    """([path], [decoded image]) of every usable image of `folder`, at least `minimum` px on each side; with
    stream=True the images are checked (decoded) and dropped, and come as `FolderImages`.
    bad_files="error" stops at the first unusable file; "skip" leaves it out with a one-line warning."""
    files, images = [], []
    for path in list_images(folder):
        try:
            image = decode_image(path, keep_gray, max_pixels)
            if min(image.shape[-2:]) < minimum:
                need = (f"the {minimum}x{minimum} px training crop (patch_size={minimum})" if purpose == "training" else
                        f"{minimum}x{minimum} px for {purpose} (SSIM's {MIN_EVAL_SIZE}x{MIN_EVAL_SIZE} window on the "
                        f"x{scale} LR image)")
                raise DataError(f"{path}: {image.shape[-1]}x{image.shape[-2]} px is too small: it needs at least "
                                f"{need}; remove it")
        except DataError as err:
            if bad_files != "skip":
                raise DataError(f"{err} (bad_files=skip leaves such files out)") from None
            print(f"warning: skipped {err}", file=sys.stderr)
            continue
        files.append(path)
        images.append(tuple(image.shape[-2:]) if stream else image)
    if not files:
        raise DataError(f"{folder}: no usable image")
    return files, FolderImages(files, images, keep_gray, max_pixels) if stream else images


@contextlib.contextmanager
def seeded(seed):
    """Transforms draw from torch's global CPU generator: seed it for one sample only, then restore it."""
    generator = torch.random.default_generator
    saved = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(saved)


def save_first_pair(lr_image, hr_image, out):
    """The handout's lr_image.png and hr_image.png: the first pair of a DataLoader batch, in folder `out`."""
    paths = []
    for name, image in (("lr_image.png", lr_image), ("hr_image.png", hr_image)):
        paths.append(os.path.join(out, name))
        with system.replaced_whole(paths[-1]) as temporary:
            pixels = image[0].clamp(0, 1).mul(255).round().byte()  # clamped: a bicubic LR overshoots [0, 1]
            torchvision.io.write_png(pixels, temporary)
    return paths


def check_batch(dataset, seed, out):
    """The handout's check: one shuffled DataLoader mini-batch of 4 pairs (seeded), its first pair saved as PNG in
    `out` (save_first_pair). Returns (lr, hr)."""
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=0, drop_last=True)
    lr_image, hr_image = next(iter(loader))
    save_first_pair(lr_image, hr_image, out)
    return lr_image, hr_image


def main(argv):
    """The handout's check, on the configured training folder: python code/dataset.py data_dir=..."""
    import config

    cfg = config.from_argv(argv, ("data", "reading", "runs_dir", "seed"))
    try:
        train_dataset = SRDataset.from_config(cfg)
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None
    print(f" * Dataset contains {len(train_dataset)} image(s).")
    out = os.path.join(cfg["runs_dir"], "dataset_check")
    os.makedirs(out, exist_ok=True)
    lr_image, hr_image = check_batch(train_dataset, cfg["seed"], out)
    print(f" * batch: lr {tuple(lr_image.shape)}, hr {tuple(hr_image.shape)}, "
          f"values in [{hr_image.min():.3f}, {hr_image.max():.3f}]")
    print(f" * wrote {out}/lr_image.png and hr_image.png")


if __name__ == "__main__":
    main(sys.argv[1:])
