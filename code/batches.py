"""The training sample stream: which sample comes when (TrainSampler), and whole batches of those samples
made at once on the training device (DeviceBatches), the same pixels as SRDataset's, bit for bit.

Sample k of a run is a function of (seed, k) alone, so a resumed run, a run with a different worker count,
and the two data paths (a DataLoader over SRDataset, or DeviceBatches) all see the same data.
"""
import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler
from torchvision import transforms

import system
from dataset import degrade, dihedral, seeded


class TrainSampler(Sampler):
    """Endless (image index, sample seed) stream for training, one epoch's permutation after another.

    `start=k` resumes the exact stream at sample k. Under DistributedDataParallel, rank r of `world_size`
    takes the r-th `batch_size` block of each global batch of the same stream.
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


class SampleParameters(IterableDataset):
    """Chunks of `count` samples' random parameters, drawn from each sample's own seed exactly as SRDataset's
    transforms draw them: one row [offset, height, width, top, left, 4 jitter factors, 4 jitter op ids,
    symmetry] a sample. Drawing is Python work per sample, so on a GPU it runs in a worker process
    (DeviceBatches' `workers`) while the GPU trains."""

    def __init__(self, shapes, sampler, count, patch_size, jitter, augment):
        self.shapes, self.sampler, self.count, self.augment = shapes, sampler, count, augment
        self.offsets = np.cumsum([0] + [c * h * w for c, h, w in shapes[:-1]]).tolist()
        self.crop = transforms.RandomCrop(patch_size)
        self.jitter = transforms.ColorJitter(jitter, jitter, jitter, jitter) if jitter > 0 else None

    def draw(self, index, seed):
        channels, height, width = self.shapes[index]
        image = torch.empty((), dtype=torch.uint8).expand(channels, height, width)  # its size, no pixels
        with seeded(seed):
            top, left, _, _ = self.crop.get_params(image, self.crop.size)
            jitter = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast, self.jitter.saturation,
                                            self.jitter.hue) if self.jitter else (torch.arange(4), 1.0, 1.0, 1.0, 0.0)
            symmetry = int(torch.randint(8, ())) if self.augment == "dihedral" else 0
        order, *factors = jitter
        return [self.offsets[index], height, width, top, left, *factors, *order.tolist(), symmetry]

    def __iter__(self):
        samples = iter(self.sampler)
        while True:
            yield torch.tensor([self.draw(*next(samples)) for _ in range(self.count)], dtype=torch.float64)


class DeviceBatches:
    """SRDataset's training samples made a whole batch at a time on the training device.

    The images are copied to the device once, as one flat buffer; per batch only each sample's random
    parameters travel (SampleParameters). Cropping is one gather, the jitter four batched passes, the LR
    `degrade` one call. `batches_per_chunk` batches are made in one go, since per batch the dispatch of a few
    hundred small tensor ops costs more than their arithmetic. workers > 0 draws the parameters in one worker
    process (for a GPU, which should not wait for Python); 0 draws them here (a CPU, whose cores are busy).
    """

    def __init__(self, images, sampler, batch_size, device, patch_size, scale=2, jitter=0.2,
                 degradation="bilinear", augment="none", batches_per_chunk=8, workers=0):
        self.batch_size, self.device, self.ready = batch_size, torch.device(device), []
        self.scale, self.degradation, self.jitter, self.augment = scale, degradation, jitter > 0, augment
        parameters = SampleParameters([tuple(image.shape) for image in images], sampler,
                                      batch_size * batches_per_chunk, patch_size, jitter, augment)
        # one worker: the stream is sequential, and more workers would each draw all of it
        self.chunks = iter(DataLoader(parameters, batch_size=None, num_workers=1,
                                      pin_memory=self.device.type == "cuda",
                                      worker_init_fn=system.ignore_stop_signals)) if workers else iter(parameters)
        # 8-bit images as they are; with any 16-bit one (uint16 has too few ops to gather from), all as int32 on
        # the 16-bit scale (x 257 maps 255 to 65535), so that a mixed folder trains like the per-sample path
        self.peak = 65535 if any(image.dtype != torch.uint8 for image in images) else 255
        self.pixels = torch.cat([image.flatten() if self.peak == 255 else
                                 image.flatten().to(torch.int32) * (257 if image.dtype == torch.uint8 else 1)
                                 for image in images]).to(self.device)
        side = torch.arange(patch_size)
        self.rows, self.columns = side.view(1, 1, -1, 1).to(self.device), side.view(1, 1, 1, -1).to(self.device)
        self.channels = torch.arange(3).view(1, 3, 1, 1).to(self.device)

    @classmethod
    def from_config(cls, cfg, images, sampler, device, workers=0):
        return cls(images, sampler, cfg["batch_size"], device, cfg["patch_size"], cfg["scale"], cfg["jitter"],
                   cfg["degradation"], cfg["augment"], workers=workers)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.ready:
            low_res, high_res = self.make(next(self.chunks).to(self.device, non_blocking=True))
            self.ready = list(zip(low_res.split(self.batch_size), high_res.split(self.batch_size)))[::-1]
        return self.ready.pop()

    def make(self, parameters):
        """The (LR, HR) samples that the rows of `parameters` (SampleParameters) describe, as two batches."""
        offset, height, width, top, left = (parameters[:, i].long().view(-1, 1, 1, 1) for i in range(5))
        index = (offset + self.channels * height * width + (top + self.rows) * width + left + self.columns)
        high_res = self.pixels[index].float() / self.peak  # ConvertImageDtype
        if self.jitter:
            high_res = jitter_batch(high_res, parameters[:, 5:9].float(), parameters[:, 9:13].long())
        if self.augment == "dihedral":
            symmetry = parameters[:, 13].long()
            for k in range(1, 8):
                chosen = (symmetry == k).nonzero().squeeze(1)
                if len(chosen):
                    high_res[chosen] = dihedral(high_res[chosen], k)
        return degrade(high_res, self.scale, self.degradation), high_res


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


@functools.lru_cache(maxsize=None)
def _hsv_to_rgb_pick(device):
    """By sector, R = (v, q, p, p, t, v), G = (t, v, v, q, p, p), B = (p, p, t, v, v, q) as in torchvision's
    _hsv2rgb, as indices into (v, q, p, t); made once per device (no host-to-device copy per batch)."""
    return torch.tensor([[0, 1, 2, 2, 3, 0], [3, 0, 0, 1, 2, 2], [2, 2, 3, 0, 0, 1]], device=device)


def hue_shift(images, shift):
    """torchvision's adjust_hue (RGB -> HSV, h + shift mod 1, HSV -> RGB) for a batch with one shift per
    image, bit-identical to it (a test checks) and several times faster than calling it image by image:
    the same arithmetic, but the hue's three masked terms (of which one is non-zero) become two `where`s,
    and HSV -> RGB picks each output channel from its candidates with one gather."""
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
    pick = _hsv_to_rgb_pick(images.device)
    return torch.stack((maxc, q, p, t), dim=-3).gather(-3, pick[:, sector].movedim(0, -3))
