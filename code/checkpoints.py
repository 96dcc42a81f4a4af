"""The one checkpoint format: a dict of tensors, numbers and strings that `torch.load(weights_only=True)`
reads, written atomically; finding a run's newest good checkpoint; and the exit codes of a training run.

    {"model": state_dict, "config": {model, num_blocks, channels, scale}, "step": N, "run": name, ...}

Periodic checkpoints (checkpoints/<run>/step<N>.pt) add the optimiser, the data position, the generator
states and the training config, so a run continues exactly where it stopped.
"""
import codecs
import glob
import json
import os
import pickle
import re
import sys
import zipfile

import torch
from PIL import Image

import system
from models import MODEL_KEYS, build_model

# With ema > 0, model.pt holds the moving average and this file, beside it, the last step's own weights.
RAW_WEIGHTS = "model_raw.pt"
FINAL_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "final", "model.pt")
# train.py's exit status besides 0 (done) and 1 (bad config, data or checkpoint)
EXIT_DIVERGED = 3  # non-finite loss: the run stopped; its last good checkpoint is kept
EXIT_INTERRUPTED = 75  # stopped by a signal (after saving a checkpoint, or at once on a second Ctrl-C): run again
#                        with resume=auto (EX_TEMPFAIL)
# the end of the line that refuses a file of another kind
WHAT_LOADS = ("only checkpoints that this project's train.py writes load here (torch.save of {'model': state_dict, "
              "'config': ..., 'step': ..., 'run': ...}, e.g. checkpoints/RUN/model.pt)")
SAFETENSORS_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the size of its JSON header


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason in one line."""


def save_checkpoint(path, model, cfg, step, **extra):
    """Write {"model": state_dict, "config": architecture keys, "step": step, "run": cfg["run"], **extra} atomically.

    Only tensors, numbers and strings go in, so `torch.load(..., weights_only=True)` can read it.
    Written through system.replaced_whole, so a crash mid-write never leaves a truncated checkpoint, and a full
    disk leaves the previous file as it was. A failed write raises OSError naming `path` (torch's own error says
    "unexpected pos" and names nothing).
    """
    payload = {"model": model.state_dict(), "config": {k: cfg[k] for k in MODEL_KEYS}, "step": step,
               "run": cfg["run"], **extra}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with system.replaced_whole(path) as temporary, open(temporary, "wb") as f:
        try:
            torch.save(payload, f)
        except RuntimeError as err:  # the zip writer's "[enforce fail ...] unexpected pos": what interrupted it
            if not isinstance(err.__context__, (OSError, KeyboardInterrupt)):  # a full disk, a second Ctrl-C
                raise
            raise err.__context__ from None
        f.flush()
        os.fsync(f.fileno())
    return path


def checkpoint_file(path):
    """The checkpoint file `path` names: a run's folder (checkpoints/<run>) stands for its model.pt, which a note
    says; a folder without one is refused, naming the files to give instead."""
    if not os.path.isdir(path):
        return path
    final = os.path.join(path, "model.pt")
    if os.path.isfile(final):
        print(f"note: {path} is a folder; using its {final}", file=sys.stderr)
        return final
    try:
        inside = sorted(name for name in os.listdir(path) if name.endswith(".pt"))
    except OSError:
        inside = []
    files = f"one of its files ({', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})" if inside else \
        "a checkpoint file, e.g. checkpoints/RUN/model.pt"
    raise CheckpointError(f"{path}: is a folder without a model.pt; give {files}")


def describe_foreign_file(path):
    """What a file that torch cannot load is, judged by its bytes: a safetensors file, a zip archive that torch
    did not write, an image, a JSON or text file, an empty file; None for anything else (a damaged torch file),
    whose own error is kept."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4096)
            if is_safetensors(f, size):
                return "a safetensors file, a format this project does not read"
    except OSError:  # unreadable: torch's error says why
        return None
    if size == 0:
        return "an empty file"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any(name.endswith("data.pkl") for name in names):  # torch's own zip, damaged inside
            return None
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"a zip archive that torch did not write (holding {listed or 'nothing'})"
    try:
        with Image.open(path) as image:
            return f"an image ({image.format}, {image.width}x{image.height} px)"
    except Exception:  # Pillow raises many types for files it cannot identify
        pass
    try:  # text: UTF-8 without NUL bytes (a character cut at the end of `head` is fine)
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return None
    if "\0" in text or not text.strip():
        return None
    if text.lstrip().startswith(("{", "[")):
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
            return "a JSON file"
        except ValueError:
            pass
    first_line = next(line for line in text.splitlines() if line.strip()).strip()
    return f"a text file starting {first_line[:60]!r}"


def is_safetensors(f, size):
    """Whether the open file `f` of `size` bytes starts as safetensors files do: the length of a JSON object as 8
    little-endian bytes, then that object."""
    f.seek(0)
    length = int.from_bytes(f.read(8), "little")
    if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_LIMIT):
        return False
    try:
        return isinstance(json.loads(f.read(length)), dict)
    except ValueError:  # not UTF-8 or not JSON
        return False


def load_checkpoint(path):
    """Read a checkpoint dict safely (weights_only=True never runs pickled code). A run's folder stands for its
    model.pt; a file of another kind is refused saying what it is."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not usable"
        kind = describe_foreign_file(path)
        if kind:
            raise CheckpointError(f"{path}: not a checkpoint but {kind}; {WHAT_LOADS}") from None
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
    if not isinstance(payload, dict) or any(key not in payload for key in ("model", "config", "step", "run")):
        raise CheckpointError(f"{path}: not a checkpoint of this repo "
                              "(expected keys 'model', 'config', 'step' and 'run')")
    return payload


def load_model(path, device="cpu"):
    """Rebuild the model stored in a checkpoint (or a run folder's model.pt); returns (model in eval mode, checkpoint
    dict)."""
    path = checkpoint_file(path)
    payload = load_checkpoint(path)
    try:
        model = build_model(payload["config"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: incomplete model config ({err})") from None
    load_weights(model, payload["model"], path)
    return model.to(device).eval(), payload


def final_model():
    """The committed final model, the default of the scripts that use one model (upscale.py, export.py)."""
    if not os.path.isfile(FINAL_MODEL):
        raise SystemExit(f"error: {FINAL_MODEL}: no such file yet (it is written when `python code/experiments.py "
                         "final` has finished); give checkpoint=PATH, e.g. checkpoints/residual_matlab/model.pt")
    return FINAL_MODEL


def checkpoint_paths(cfg):
    """The checkpoints cfg["checkpoint"] names (comma-separated), or every model.pt under cfg["ckpt_dir"]."""
    if cfg["checkpoint"]:
        return [p for p in cfg["checkpoint"].split(",") if p]
    return sorted(glob.glob(os.path.join(cfg["ckpt_dir"], "*", "model.pt")))


def load_models(cfg, device):
    """[(path, model, checkpoint dict)] of the checkpoints `cfg` names, each refused unless trained for cfg's scale;
    of those found under ckpt_dir (none named), the ones trained for another scale are left out with a note."""
    models = [(path, *load_model(path, device)) for path in checkpoint_paths(cfg)]
    if not cfg["checkpoint"]:  # found under ckpt_dir: those trained for another scale are left out, with a note
        kept = [entry for entry in models if entry[2]["config"]["scale"] == cfg["scale"]]
        if len(kept) < len(models):
            print(f"note: {len(models) - len(kept)} of the checkpoints under {cfg['ckpt_dir']}/*/model.pt were trained "
                  f"for another scale than {cfg['scale']}; left out", file=sys.stderr)
        models = kept
    for path, _, payload in models:
        if payload["config"]["scale"] != cfg["scale"]:
            raise CheckpointError(f"{path}: trained for scale {payload['config']['scale']}, "
                                  f"evaluating scale={cfg['scale']}")
    return models


def method_name(payload):
    """A checkpoint's name in tables and on the comparison page: run, architecture and step."""
    return f"{payload['run']} ({payload['config']['model']}, step {payload['step']})"


def method_names(models):
    """method_name of each loaded (path, model, checkpoint dict), with the path added where two would read the same
    (a run's model.pt and model_raw.pt, or a run folder renamed after training)."""
    names = [method_name(payload) for _, _, payload in models]
    return [name if names.count(name) == 1 else f"{name}, {path}" for name, (path, _, _) in zip(names, models)]


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


def step_path(ckpt_dir, step):
    """The periodic checkpoint of `step`: step000500.pt."""
    return os.path.join(ckpt_dir, f"step{step:06d}.pt")


def step_checkpoints(ckpt_dir):
    """Periodic checkpoints of a run (step_path's names), newest first by step number: step1000000.pt before
    step999500.pt, which sorts first as text."""
    found = [(int(match[1]), path) for path in glob.glob(os.path.join(ckpt_dir, "step*.pt"))
             if (match := re.fullmatch(r"step(\d+)\.pt", os.path.basename(path)))]
    return [path for _, path in sorted(found, reverse=True)]


def newest_good_state(ckpt_dir):
    """The newest periodic checkpoint that loads; a broken one is named and passed over."""
    for path in step_checkpoints(ckpt_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            print(f"warning: {err}; trying the previous checkpoint", file=sys.stderr)
    return None, None
