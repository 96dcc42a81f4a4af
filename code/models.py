"""Task 2: BasicSRModel, its residual variant (Task 5), and the one checkpoint format.

    python code/models.py   # prints the parameter count: 372803 with the defaults
"""
import os
import sys

import torch
from torch import nn

# The config keys that define an architecture; a checkpoint stores them so it can rebuild its model.
MODEL_KEYS = ("model", "num_blocks", "channels", "scale")


class BasicSRModel(nn.Module):
    """Bilinear upsampling followed by a plain stack of 3x3 convolutions (handout Figure 2).

    With residual=True the convolutions predict a correction that is added to the bilinear
    upsampling (Figure 4), so the network only has to learn the missing detail.
    """

    def __init__(self, num_blocks=10, channels=64, scale=2, residual=False):
        super().__init__()
        self.residual = residual
        self.upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
        layers = [nn.Conv2d(3, channels, 3, padding=1), nn.LeakyReLU()]
        for _ in range(num_blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.LeakyReLU()]
        layers.append(nn.Conv2d(channels, 3, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, low_res):
        upsampled = self.upsample(low_res)
        prediction = self.body(upsampled)
        return upsampled + prediction if self.residual else prediction


class Discriminator(nn.Module):
    """SRGAN's VGG-style discriminator, narrowed for 64x64 patches: pairs of 3x3 convolutions (the second
    with stride 2) doubling the width 32 -> 256 while halving the size 64 -> 4, then a small classifier.
    No batch norm (as in later ESRGAN practice): one logit per image, real (HR) vs generated.
    Global average pooling before the classifier lets it take any patch size."""

    def __init__(self, channels=32, stages=4):
        super().__init__()
        layers, width_in = [], 3
        for stage in range(stages):
            width = channels * 2 ** stage
            layers += [nn.Conv2d(width_in, width, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(width, width, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            width_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width_in, 256),
                                        nn.LeakyReLU(0.2), nn.Linear(256, 1))

    def forward(self, image):
        return self.classifier(self.features(image)).squeeze(1)


def build_model(cfg):
    """The model that `cfg` (a config dict, or a checkpoint's stored model config) describes."""
    return BasicSRModel(cfg["num_blocks"], cfg["channels"], cfg["scale"], residual=cfg["model"] == "residual")


def count_parameters(model):
    return sum(param.numel() for param in model.parameters())


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


def save_checkpoint(path, model, cfg, step, **extra):
    """Write {"model": state_dict, "config": architecture keys, "step": step, **extra} atomically.

    Only tensors, numbers and strings go in, so `torch.load(..., weights_only=True)` can read it.
    A temporary file + os.replace means a crash mid-write never leaves a truncated checkpoint.
    """
    payload = {"model": model.state_dict(), "config": {k: cfg[k] for k in MODEL_KEYS}, "step": step,
               "run": cfg["run"], **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path):
    """Read a checkpoint dict safely (weights_only=True never runs pickled code)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not usable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(f"{path}: not a checkpoint of this repo (expected keys 'model' and 'config')")
    return payload


def load_model(path, device="cpu"):
    """Rebuild the model stored in a checkpoint; returns (model in eval mode, checkpoint dict)."""
    payload = load_checkpoint(path)
    try:
        model = build_model(payload["config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: incomplete model config ({err})") from None
    load_weights(model, payload["model"], path)
    return model.to(device).eval(), payload


def load_weights(model, state_dict, path):
    """load_state_dict(strict=True), with a mismatch reported in one line instead of a traceback."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for name, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)) if items]
        raise CheckpointError(f"{path}: weights do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state_dict)


if __name__ == "__main__":
    import config

    cfg = config.from_argv(sys.argv[1:])
    model = build_model(cfg)
    print(model)
    print(f"{cfg['model']} model, {cfg['num_blocks']} blocks of {cfg['channels']} channels: "
          f"{count_parameters(model)} parameters")
