"""The one checkpoint format: a dict of tensors, numbers and strings that `torch.load(weights_only=True)`
reads, written atomically; finding a run's newest good checkpoint; and the exit codes of a training run.

    {"model": state_dict, "config": {model, num_blocks, channels, scale}, "step": N, "run": name, ...}

Periodic checkpoints (checkpoints/<run>/step<N>.pt) add the optimiser, the data position, the generator
states and the training config, so a run continues exactly where it stopped.
"""
import glob
import os
import pickle
import re
import sys

import torch

from models import MODEL_KEYS, build_model

# With ema > 0, model.pt holds the moving average and this file, beside it, the last step's own weights.
RAW_WEIGHTS = "model_raw.pt"
# train.py's exit status besides 0 (done) and 1 (bad config, data or checkpoint)
EXIT_DIVERGED = 3  # non-finite loss: the run stopped; its last good checkpoint is kept
EXIT_INTERRUPTED = 75  # stopped by a signal after saving a checkpoint: run again with resume=auto (EX_TEMPFAIL)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


def save_checkpoint(path, model, cfg, step, **extra):
    """Write {"model": state_dict, "config": architecture keys, "step": step, **extra} atomically.

    Only tensors, numbers and strings go in, so `torch.load(..., weights_only=True)` can read it.
    A temporary file + os.replace means a crash mid-write never leaves a truncated checkpoint, and a full disk
    leaves the previous file as it was. A failed write raises OSError naming `path` (torch's own error says
    "unexpected pos" and names nothing).
    """
    payload = {"model": model.state_dict(), "config": {k: cfg[k] for k in MODEL_KEYS}, "step": step,
               "run": cfg["run"], **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(payload, f)
            except RuntimeError as err:  # the zip writer's "[enforce fail ...] unexpected pos": the OSError behind it
                if not isinstance(err.__context__, OSError):
                    raise
                raise err.__context__ from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(err.errno, err.strerror, path) from None
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
        text = str(err).strip()
        pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if pickled:
            raise CheckpointError(f"{path}: holds a pickled Python object ({pickled.group(1)}; a whole model saved by "
                                  f"torch.save(model)?), which weights_only=True refuses to run; save "
                                  f"model.state_dict() instead") from None
        # weights_only's text is several lines of advice around its reason; keep the reason only
        unpickler = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        reason = (unpickler.group(1) if unpickler else "unpickling failed" if isinstance(err, pickle.UnpicklingError)
                  else text.splitlines()[0] if text else type(err).__name__)
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


def step_checkpoints(ckpt_dir):
    """Periodic checkpoints of a run, newest first."""
    return sorted(glob.glob(os.path.join(ckpt_dir, "step*.pt")), reverse=True)


def newest_good_state(ckpt_dir):
    """The newest periodic checkpoint that loads; a broken one is named and passed over."""
    for path in step_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    return None, None
