"""Task 1: SRDataset, which makes (low-res, high-res) pairs from a folder of ordinary images.

The HR image is a random 64x64 crop with colour jitter; the LR image is made from that jittered
crop by `degrade`, the one place where the degradation lives, so LR and HR always correspond.

    python code/dataset.py [data_dir=...]   # the handout's data-loader check
"""
import contextlib
import math
import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.io import ImageReadMode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MIN_EVAL_SIZE = 11  # pixels of the LR image: SSIM's window
INTERPOLATION = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "nearest": transforms.InterpolationMode.NEAREST,
}


class DataError(ValueError):
    """A missing folder or an unreadable image; the message names it in one line."""


def list_images(folder):
    """Sorted image files of `folder`; hidden files and non-images (README, Thumbs.db) are ignored."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder")
    names = sorted(n for n in os.listdir(folder)
                   if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def read_image(path):
    """Read any common image as a 3xHxW float tensor in [0, 1]."""
    return to_float(decode_image(path))


def decode_image(path, keep_gray=False):
    """Decode to a 3xHxW uint8 (uint16 for 16-bit files) tensor; 1xHxW for a grayscale file if keep_gray.

    torchvision decodes PNG/JPEG (gray, palette, RGBA and CMYK become RGB); Pillow covers what
    it cannot decode, such as BMP and TIFF.
    """
    try:
        image = torchvision.io.read_image(path, ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        image = _read_with_pillow(path)
    return image[:1] if keep_gray and _is_gray(path) else image


def _is_gray(path):
    with Image.open(path) as pil:
        return pil.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")


def to_float(image):
    return transforms.functional.convert_image_dtype(image, torch.float32)


def _read_with_pillow(path):
    try:
        with Image.open(path) as pil:
            if pil.mode.startswith("I"):  # 16/32-bit grayscale
                array = np.asarray(pil, dtype=np.int32).clip(0, 65535).astype(np.uint16)
                return torch.from_numpy(array)[None].expand(3, -1, -1).contiguous()
            array = np.asarray(pil.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def degrade(hr, scale=2, method="bilinear"):
    """Make the LR image: resize HR (CxHxW or NxCxHxW) down by `scale` with `method`.

    bilinear / bicubic / nearest: torchvision's Resize (antialiased). bicubic_matlab: MATLAB's
    `imresize`, the degradation of the published SR benchmarks, rounded to 8 bits as they are.
    """
    if method == "bicubic_matlab":
        return imresize_matlab(hr, 1 / scale).mul(255).round().clamp(0, 255).div(255).to(hr.dtype)
    height, width = hr.shape[-2] // scale, hr.shape[-1] // scale
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


def imresize_matlab(image, scale):
    """MATLAB's `imresize(image, scale)` (bicubic, antialiased) for a CxHxW or NxCxHxW float tensor.

    Computed in float64, height first as MATLAB does for equal scales; not rounded.
    """
    height, width = image.shape[-2:]
    out_height, out_width = (math.ceil(side * scale - 1e-9) for side in (height, width))  # 255 * (1/3) is 85
    rows = _resize_matrix(height, out_height, scale).to(image.device)
    cols = _resize_matrix(width, out_width, scale).to(image.device)
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
    decoding a whole photo. bad_files="error" stops at the first unusable file; "skip" leaves it
    out with a one-line warning.
    """

    def __init__(self, folder, patch_size=64, scale=2, jitter=0.2, degradation="bilinear", train=True,
                 bad_files="error", augment="none"):
        self.scale, self.degradation, self.train, self.augment = scale, degradation, train, augment
        # crop while still 8-bit, so only the patch is converted to float
        steps = [transforms.RandomCrop(patch_size), transforms.ConvertImageDtype(torch.float32)]
        if jitter > 0:
            steps.append(transforms.ColorJitter(jitter, jitter, jitter, jitter))
        self.transform = transforms.Compose(steps)
        # whole eval images must still leave SSIM's 11x11 window room after downscaling
        minimum = patch_size if train else MIN_EVAL_SIZE * scale
        self.files, self.images = [], []
        for path in list_images(folder):
            try:
                image = decode_image(path)
                if min(image.shape[-2:]) < minimum:
                    raise DataError(f"{path}: {image.shape[-1]}x{image.shape[-2]} px is smaller than "
                                    f"{'patch_size=' if train else ''}{minimum}")
            except DataError as err:
                if bad_files != "skip":
                    raise DataError(f"{err} (bad_files=skip leaves such files out)") from None
                print(f"warning: skipped {err}", file=sys.stderr)
                continue
            self.files.append(path)
            self.images.append(image)
        if not self.files:
            raise DataError(f"{folder}: no usable image")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, tuple) else (index, None)
        image = self.images[index]
        if not self.train:
            hr = to_float(crop_to_multiple(image, self.scale))
        else:
            with seeded(seed) if seed is not None else contextlib.nullcontext():
                hr = self.transform(image)
                if self.augment == "dihedral":  # drawn after the crop and jitter, so they stay as without it
                    hr = dihedral(hr, int(torch.randint(8, ())))
        return degrade(hr, self.scale, self.degradation), hr


def dihedral(images, k):
    """The k-th of the 8 symmetries of the square (k = 0..7): k % 4 quarter turns, then a mirror if k >= 4.
    Natural images look as plausible turned or mirrored, so this multiplies the distinct training crops
    by 8 (EDSR's augmentation)."""
    images = torch.rot90(images, k % 4, dims=(-2, -1))
    return images.flip(-1) if k >= 4 else images


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


class DeviceBatches:
    """SRDataset's training samples made a whole batch at a time on the training device: the GPU path,
    and on a CPU twice as fast as sample by sample when no DataLoader workers are used.

    The images are copied to the device once, as one flat uint8 buffer; per batch only the random
    parameters travel: each sample's crop position and colour-jitter factors and order are drawn on the
    CPU from the sample's seed by the dataset's own RandomCrop/ColorJitter objects (`get_params`), so
    the samples are the same as SRDataset's for the same (index, seed), bit for bit (a test
    compares them). Cropping is one gather, the jitter four batched passes, the LR `degrade` one call.
    `batches_per_chunk` batches are made in one go: per batch, a few hundred small tensor ops cost more in
    dispatch than in arithmetic, and making 8 at once cut the CPU cost per batch from about 12 to 8 ms.
    """

    def __init__(self, dataset, sampler, batch_size, device, batches_per_chunk=8):
        steps = dataset.transform.transforms
        self.crop, self.jitter = steps[0], steps[-1] if isinstance(steps[-1], transforms.ColorJitter) else None
        self.dataset, self.batch_size, self.device = dataset, batch_size, torch.device(device)
        self.samples, self.batches_per_chunk, self.ready = iter(sampler), batches_per_chunk, []
        sizes = [image.numel() for image in dataset.images]
        self.pixels = torch.cat([image.flatten() for image in dataset.images]).to(self.device)
        self.offsets = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
        side = torch.arange(dataset.transform.transforms[0].size[0])
        self.rows, self.columns = side.view(1, 1, -1, 1).to(self.device), side.view(1, 1, 1, -1).to(self.device)
        self.channels = torch.arange(3).view(1, 3, 1, 1).to(self.device)

    def sample_parameters(self, index, seed):
        """[offset, height, width, top, left, 4 jitter factors, 4 jitter op ids, symmetry]: what the transforms
        would draw for this sample, in the order they draw it."""
        image = self.dataset.images[index]
        with seeded(seed):
            top, left, _, _ = self.crop.get_params(image, self.crop.size)
            jitter = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast, self.jitter.saturation,
                                            self.jitter.hue) if self.jitter else (torch.arange(4), 1.0, 1.0, 1.0, 0.0)
            symmetry = int(torch.randint(8, ())) if self.dataset.augment == "dihedral" else 0
        order, *factors = jitter
        return [self.offsets[index], image.shape[1], image.shape[2], top, left, *factors, *order.tolist(), symmetry]

    def __iter__(self):
        return self

    def __next__(self):
        if not self.ready:
            low_res, high_res = self.make(self.batch_size * self.batches_per_chunk)
            self.ready = list(zip(low_res.split(self.batch_size), high_res.split(self.batch_size)))[::-1]
        return self.ready.pop()

    def make(self, count):
        """The next `count` (LR, HR) training samples of the sampler's stream, as two batches."""
        parameters = torch.tensor([self.sample_parameters(*next(self.samples)) for _ in range(count)],
                                  dtype=torch.float64).to(self.device, non_blocking=True)
        offset, height, width, top, left = (parameters[:, i].long().view(-1, 1, 1, 1) for i in range(5))
        index = (offset + self.channels * height * width + (top + self.rows) * width + left + self.columns)
        high_res = self.pixels[index].float() / 255  # ConvertImageDtype
        if self.jitter is not None:
            high_res = jitter_batch(high_res, parameters[:, 5:9].float(), parameters[:, 9:13].long())
        if self.dataset.augment == "dihedral":
            symmetry = parameters[:, 13].long()
            for k in range(1, 8):
                chosen = (symmetry == k).nonzero().squeeze(1)
                if len(chosen):
                    high_res[chosen] = dihedral(high_res[chosen], k)
        return degrade(high_res, self.dataset.scale, self.dataset.degradation), high_res


def jitter_batch(images, factors, order, host_free=None):
    """ColorJitter for a batch with per-sample (brightness, contrast, saturation, hue) `factors` (Nx4)
    applied in per-sample `order` (Nx4 op ids), with torchvision's adjust_* formulas. On a GPU
    (`host_free`, default: images on CUDA) every op is computed for every sample at each of the four
    positions and selected per sample, so nothing waits for the host; on a CPU each op runs only on
    the samples that apply it at that position."""
    def blend(image, other, factor):  # torchvision's _blend, with in-place steps
        factor = factor.view(-1, 1, 1, 1)
        return (factor * image).add_((1.0 - factor) * other).clamp_(0, 1)

    gray = transforms.functional.rgb_to_grayscale
    # brightness blends with black: f * x + (1 - f) * 0 is exactly f * x
    ops = (lambda image, f: (f.view(-1, 1, 1, 1) * image).clamp_(0, 1),
           lambda image, f: blend(image, gray(image).mean(dim=(-3, -2, -1), keepdim=True), f),
           lambda image, f: blend(image, gray(image), f),
           hue_shift)
    for position in range(4):
        op = order[:, position]
        if images.is_cuda if host_free is None else host_free:
            candidates = [apply(images, factors[:, kind]) for kind, apply in enumerate(ops)]
            images = torch.where(op.view(-1, 1, 1, 1) == 0, candidates[0],
                                 torch.where(op.view(-1, 1, 1, 1) == 1, candidates[1],
                                             torch.where(op.view(-1, 1, 1, 1) == 2, candidates[2], candidates[3])))
        else:
            images = images.clone()
            for kind, apply in enumerate(ops):
                chosen = (op == kind).nonzero().squeeze(1)
                if len(chosen):
                    images[chosen] = apply(images[chosen], factors[chosen, kind])
    return images


def hue_shift(images, shift):
    """torchvision's adjust_hue (RGB -> HSV, h + shift mod 1, HSV -> RGB) for a batch with one shift per
    image, bit-identical to it (a test checks) and 3.9x faster than calling it image by image (3.4 vs
    13.3 ms for 16x3x64x64 on one thread): the same arithmetic, but the hue's three masked terms (of
    which one is non-zero) become two `where`s, h * 6 is computed once, and HSV -> RGB picks each
    output channel from its candidates with one gather instead of a one-hot einsum.
    Hue is the largest part of the cost of making a training batch."""
    red, green, blue = images.unbind(dim=-3)
    maxc, minc = images.amax(dim=-3), images.amin(dim=-3)
    gray = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(gray, ones, maxc)
    divisor = torch.where(gray, ones, chroma)
    rc, gc, bc = (maxc - red).div_(divisor), (maxc - green).div_(divisor), (maxc - blue).div_(divisor)
    hue = torch.where(maxc == red, bc - gc, torch.where(maxc == green, (2.0 + rc).sub_(bc), (4.0 + gc).sub_(rc)))
    hue = torch.fmod(hue.div_(6.0).add_(1.0), 1.0).add_(shift.view(-1, 1, 1)).remainder_(1.0).mul_(6.0)
    sector = torch.floor(hue)
    fraction = hue.sub_(sector)
    sector = sector.to(torch.int64).remainder_(6)
    p = (1.0 - saturation).mul_(maxc).clamp_(0.0, 1.0)
    q = (saturation * fraction).neg_().add_(1.0).mul_(maxc).clamp_(0.0, 1.0)
    t = (1.0 - fraction).mul_(saturation).neg_().add_(1.0).mul_(maxc).clamp_(0.0, 1.0)
    # by sector, R = (v, q, p, p, t, v), G = (t, v, v, q, p, p), B = (p, p, t, v, v, q) as in _hsv2rgb
    pick = torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]], device=images.device)
    return torch.stack((maxc, q, p, t), dim=-3).gather(-3, pick[:, sector].movedim(0, -3))


class TrainSampler(Sampler):
    """Endless (image index, sample seed) stream for training, one epoch's permutation after another.

    Sample k of a run depends only on (seed, k), so `start=k` resumes the exact data stream and
    the worker count cannot change what the model sees. Under DistributedDataParallel, rank r of
    `world_size` takes the r-th `batch_size` block of each global batch of the same stream.
    """

    def __init__(self, num_images, seed=0, start=0, rank=0, world_size=1, batch_size=1):
        self.num_images, self.seed, self.start = num_images, seed, start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self._epoch, self._order = None, None

    def sample(self, k):
        epoch, position = divmod(k, self.num_images)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_derive_seed(self.seed, 0, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.num_images, generator=generator).tolist()
        return self._order[position], _derive_seed(self.seed, 1, k)

    def __iter__(self):
        global_batch = self.start
        while True:
            first = global_batch + self.rank * self.batch_size
            for k in range(first, first + self.batch_size):
                yield self.sample(k)
            global_batch += self.world_size * self.batch_size


def _derive_seed(*numbers):
    """A well-mixed 63-bit seed from a tuple of non-negative integers."""
    return int(np.random.SeedSequence(numbers).generate_state(2, np.uint64)[0] >> np.uint64(1))


def main(argv):
    """The handout's check: one shuffled mini-batch from a DataLoader, its first pair saved as PNG."""
    import config

    cfg = config.from_argv(argv)
    try:
        train_dataset = SRDataset(cfg["data_dir"], cfg["patch_size"], cfg["scale"], cfg["jitter"],
                                  cfg["degradation"])
    except DataError as err:
        raise SystemExit(f"data error: {err}") from None
    torch.manual_seed(cfg["seed"])
    train_dataloader = DataLoader(train_dataset, batch_size=4, shuffle=True, num_workers=2,
                                  drop_last=True, pin_memory=torch.cuda.is_available())
    print(f" * Dataset contains {len(train_dataset)} image(s).")
    out = os.path.join(cfg["runs_dir"], "dataset_check")
    os.makedirs(out, exist_ok=True)
    for _, batch in enumerate(train_dataloader, 0):
        lr_image, hr_image = batch
        print(f" * batch: lr {tuple(lr_image.shape)}, hr {tuple(hr_image.shape)}, "
              f"values in [{hr_image.min():.3f}, {hr_image.max():.3f}]")
        for name, image in (("lr_image.png", lr_image), ("hr_image.png", hr_image)):
            torchvision.io.write_png(image[0].mul(255).round().byte(), os.path.join(out, name))
            print(f" * wrote {os.path.join(out, name)}")
        break  # one batch is enough for a check


if __name__ == "__main__":
    main(sys.argv[1:])
