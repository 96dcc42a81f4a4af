"""Task 2: BasicSRModel, its residual variant (Task 5), the GAN discriminator (Task 6), the x8 self-ensemble, tiled
upscaling, and the model as an ONNX file run by onnxruntime. The checkpoint format that stores them is in
checkpoints.py.

    python code/models.py   # prints the parameter count: 372803 with the defaults
"""
import math
import sys

import numpy as np
import torch
from torch import nn
from torchvision.transforms.functional import convert_image_dtype

# The config keys that define an architecture; a checkpoint stores them so it can rebuild its model.
MODEL_KEYS = ("model", "num_blocks", "channels", "scale")
ONNX_OPSET = 20  # of exported models (to_onnx): the exporter's default, which the pinned onnxruntime runs


class BasicSRModel(nn.Module):
    """Bilinear upsampling followed by a plain stack of 3x3 convolutions (handout Figure 2).

    With residual=True the convolutions predict a correction that is added to the bilinear
    upsampling (Figure 4), so the network only has to learn the missing detail.
    """

    def __init__(self, num_blocks=10, channels=64, scale=2, residual=False):
        super().__init__()
        self.residual, self.scale = residual, scale
        self.upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
        layers = [nn.Conv2d(3, channels, 3, padding=1), nn.LeakyReLU()]
        for _ in range(num_blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU()]
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def receptive_margin(self):
        """LR pixels around a pixel that affect its output: each 3x3 convolution reaches one HR pixel further, and
        the bilinear upsampling (align_corners=False) scale // 2 more, the HR pixels it places outside the outermost
        LR pixel centres. Tiled inference overlaps tiles by this much."""
        convolutions = sum(isinstance(layer, nn.Conv2d) for layer in self.body)
        return math.ceil((convolutions + self.scale // 2) / self.scale)

    def forward(self, low_res):
        upsampled = self.upsample(low_res)
        prediction = self.body(upsampled)
        return upsampled + prediction if self.residual else prediction


class Discriminator(nn.Module):
    """SRGAN's VGG-style discriminator, narrowed for 64x64 patches: pairs of 3x3 convolutions (the second
    with stride 2) doubling the width `channels` -> 8x while halving the size 64 -> 4, then a small classifier.
    No batch norm (as in later ESRGAN practice): one logit per image, real (HR) vs generated.
    Global average pooling before the classifier lets it take any patch size. spectral=True normalises every
    layer's weights by their largest singular value (Miyato et al. 2018, as Real-ESRGAN's discriminator does), which
    keeps a stronger discriminator's gradients from exploding."""

    def __init__(self, channels=32, stages=4, spectral=False):
        super().__init__()
        norm = nn.utils.parametrizations.spectral_norm if spectral else (lambda layer: layer)
        layers, width_in = [], 3
        for stage in range(stages):
            width = channels * 2 ** stage
            layers += [norm(nn.Conv2d(width_in, width, 3, padding=1)), nn.LeakyReLU(0.2),
                       norm(nn.Conv2d(width, width, 3, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), norm(nn.Linear(width_in, 256)),
                                        nn.LeakyReLU(0.2), norm(nn.Linear(256, 1)))

    def forward(self, image, with_features=False):
        """The logit of each image; with_features: also the activations after each stage (its 4 resolutions),
        which feature matching compares between HR and prediction."""
        stages = []
        for index, layer in enumerate(self.features):  # what self.features(image) computes, layer by layer
            image = layer(image)
            if index % 4 == 3:  # after a stage's strided convolution and its activation
                stages.append(image)
        logits = self.classifier(image).squeeze(1)
        return (logits, stages) if with_features else logits


def build_model(cfg):
    """The model that `cfg` (a config dict, or a checkpoint's stored model config) describes."""
    return BasicSRModel(cfg["num_blocks"], cfg["channels"], cfg["scale"], residual=cfg["model"] == "residual")


def self_ensemble(upscale):
    """x8 geometric self-ensemble: the mean of the outputs for the 4 rotations of the image and of its mirror."""
    def ensembled(low_res):
        total = 0
        for flip in (False, True):
            flipped = low_res.flip(-1) if flip else low_res
            for turns in range(4):
                out = upscale(flipped.rot90(turns, (-2, -1))).rot90(-turns, (-2, -1))
                total = total + (out.flip(-1) if flip else out)
        return total / 8
    return ensembled


def _spans(length, tile, margin):
    """(start, end) of each tile's core and of the window around it that the model sees."""
    for start in range(0, length, tile):
        end = min(start + tile, length)
        yield start, end, max(0, start - margin), min(length, end + margin)


@torch.no_grad()
def upscale_tiled(model, low_res, scale, tile, margin, progress=None, output=None):
    """model(low_res) for an Nx3xHxW batch, computed in tiles of `tile` LR px a side, each seen with `margin` px
    of context (the result equals the whole image's when the margin covers the receptive field); returns a float
    Nx3x(sH)x(sW) tensor on the input's device.
    An 8- or 16-bit `low_res` is converted to [0, 1] a window at a time, and a given 8-bit `output` receives each
    tile clamped and rounded, so that a huge photo is held in 8 bits, never whole in floats (upscale.py)."""
    height, width = low_res.shape[-2:]
    if output is None:
        output = torch.empty(low_res.shape[0], 3, height * scale, width * scale, device=low_res.device)
    for top, bottom, window_top, window_bottom in _spans(height, tile, margin):
        for left, right, window_left, window_right in _spans(width, tile, margin):
            window = low_res[..., window_top:window_bottom, window_left:window_right]
            if not window.is_floating_point():
                window = convert_image_dtype(window, torch.float32)
            y0, x0 = (top - window_top) * scale, (left - window_left) * scale
            result = model(window)[..., y0:y0 + (bottom - top) * scale, x0:x0 + (right - left) * scale]
            if output.dtype == torch.uint8:
                result = result.clamp(0, 1).mul_(255).round_().byte()
            output[..., top * scale:bottom * scale, left * scale:right * scale] = result.to(output.device)
            if progress is not None:
                progress.update(1)
    return output


def tiled_upscaler(model, tile=256):
    """`model` as a function whose memory does not grow with the image: inputs larger than `tile` LR px a side
    go through in tiles with the receptive field as overlap (the same result); smaller ones at once."""
    def upscale(low_res):
        if max(low_res.shape[-2:]) <= tile:
            return model(low_res)
        return upscale_tiled(model, low_res, model.scale, tile, model.receptive_margin())
    return upscale


def to_onnx(model):
    """The bytes of an ONNX file computing `model` (opset ONNX_OPSET): input `low_res`, float32 Nx3xHxW in [0, 1],
    with batch, height and width free; output `high_res`, Nx3x(sH)x(sW), the bilinear upsampling inside. Written by
    torch.onnx's exporter; the source paths and lines it records on each node are dropped, so that the bytes depend
    on the weights alone, not on where the repository is."""
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    example = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # sizes of 1 would be fixed
    program = torch.onnx.export(model, (example,), dynamo=True, input_names=["low_res"], output_names=["high_res"],
                                dynamic_shapes={"low_res": dims}, opset_version=ONNX_OPSET, verbose=False)
    for node in program.model_proto.graph.node:
        del node.metadata_props[:]
    return program.model_proto.SerializeToString()


def onnx_session(onnx_bytes, threads):
    """An onnxruntime session that runs the ONNX file `onnx_bytes` on the CPU with `threads` threads."""
    import onnxruntime  # here: only the scripts that run ONNX pay for importing it

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def run_onnx(session, low_res):
    """A session of `to_onnx`'s file applied to a float Nx3xHxW tensor, returned as a float tensor."""
    array = np.ascontiguousarray(low_res.detach().cpu().numpy(), dtype=np.float32)
    return torch.from_numpy(session.run(None, {"low_res": array})[0])


class OnnxModel:
    """`model` exported (to_onnx) and run by onnxruntime on the CPU, called like the model: a float Nx3xHxW tensor in,
    its float x`scale` output out. On AVX2 CPUs it is faster than PyTorch's fp32 (README, Performance). Exported at
    the first call, so that a script that stops before its work pays nothing for it."""

    def __init__(self, model, threads):
        self.model, self.threads, self.session = model, threads, None
        self.scale = model.scale

    def receptive_margin(self):
        return self.model.receptive_margin()

    def __call__(self, low_res):
        if self.session is None:
            self.session = onnx_session(to_onnx(self.model), self.threads)
        return run_onnx(self.session, low_res)


def count_parameters(model):
    return sum(param.numel() for param in model.parameters())


if __name__ == "__main__":
    import config

    cfg = config.from_argv(sys.argv[1:], ("model", "scale"))
    model = build_model(cfg)
    print(model)
    print(f"{cfg['model']} model, {cfg['num_blocks']} blocks of {cfg['channels']} channels: "
          f"{count_parameters(model)} parameters")
