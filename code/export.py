"""Export a checkpoint to an ONNX file that runs without PyTorch (onnxruntime, C++, a phone, a browser).

    python code/export.py                                          # checkpoints/final/model.pt -> final.onnx
    python code/export.py checkpoint=checkpoints/residual/model.pt out=residual.onnx

The file maps a float32 Nx3xHxW image in [0, 1] of any size to its x2 result, the bilinear upsampling inside
(models.to_onnx). Before it is written, onnxruntime runs it on a real photo at two sizes with odd sides and its
output is compared with PyTorch's: above TOLERANCE the script stops with one line and writes nothing.
"""
import os
import sys
import time

import torch
from skimage import data

import config
import system
from checkpoints import CheckpointError, checkpoint_file, final_model, load_model
from models import ONNX_OPSET, onnx_session, run_onnx, to_onnx

# LR sizes (height, width) of the parity check: two different ones, odd sides among them
CHECK_SIZES = ((97, 131), (128, 75))
# Largest |onnxruntime - PyTorch| accepted, on outputs in [0, 1]. Both compute in fp32, only in another order of the
# same sums, which leaves differences of a few float32 ulps of the activations (README, ONNX export); 1e-4 is far
# above that and 1/39 of one 8-bit level, so an accepted file gives the same 8-bit image up to values that sit on
# a rounding boundary, while a wrong upsampling (align_corners, antialias) or wrong weights differ by far more.
TOLERANCE = 1e-4
SPEED_SIZE = 128  # LR px a side of the timed image


def photo(height, width):
    """The centre height x width of a real photograph (scikit-image's astronaut, 512x512), a float 1x3xHxW tensor."""
    top, left = (512 - height) // 2, (512 - width) // 2
    pixels = torch.from_numpy(data.astronaut()[top:top + height, left:left + width].copy())
    return pixels.permute(2, 0, 1)[None].float() / 255


def largest_difference(session, model, low_res):
    with torch.inference_mode():
        return (run_onnx(session, low_res) - model(low_res)).abs().max().item()


def seconds(run, low_res, rounds=3):
    """Median wall time of run(low_res), after one call that is not timed."""
    run(low_res)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run(low_res)
        times.append(time.perf_counter() - start)
    return sorted(times)[rounds // 2]


def main(argv):
    cfg = config.from_argv(argv, ("checkpoint", "out"))
    try:
        checkpoint = checkpoint_file(cfg["checkpoint"] or final_model())  # a run's folder: its model.pt
        model, payload = load_model(checkpoint)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    out = cfg["out"] or os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) + ".onnx"
    system.check_writable(os.path.dirname(out) or ".")  # before the work, not after it
    onnx_bytes = to_onnx(model)
    threads = torch.get_num_threads()
    session = onnx_session(onnx_bytes, threads)
    for height, width in CHECK_SIZES:
        difference = largest_difference(session, model, photo(height, width))
        print(f"parity on a {height}x{width} photo: largest |onnxruntime - PyTorch| = {difference:.1e}")
        if difference > TOLERANCE:
            raise SystemExit(f"error: {out} not written: onnxruntime's output differs from PyTorch's by "
                             f"{difference:.1e} on a {height}x{width} photo, above the fp32 tolerance {TOLERANCE:g}")
    system.write_file(out, onnx_bytes)
    scale = payload["config"]["scale"]
    print(f"wrote {out} ({len(onnx_bytes) / 1e6:.1f} MB, ONNX opset {ONNX_OPSET}): input 'low_res' float32 Nx3xHxW "
          f"in [0, 1], any N, H and W; output 'high_res' float32 Nx3x{scale}Hx{scale}W (clamp to [0, 1])")
    low_res = photo(SPEED_SIZE, SPEED_SIZE)
    with torch.inference_mode():
        pytorch = seconds(model, low_res)
    onnxruntime = seconds(lambda image: run_onnx(session, image), low_res)
    print(f"speed on a {SPEED_SIZE}x{SPEED_SIZE} photo, this CPU, {threads} threads: PyTorch {pytorch:.2f} s, "
          f"onnxruntime {onnxruntime:.2f} s ({pytorch / onnxruntime:.2f}x)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
