import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import upscale
from conftest import photo_crops
import checkpoints
from checkpoints import load_model, save_checkpoint
from models import OnnxModel, build_model, self_ensemble, upscale_tiled


@pytest.fixture
def model_path(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    cfg = dict(tiny_cfg, model="residual", num_blocks=3)
    model = build_model(cfg)
    for param in model.parameters():  # make the receptive field matter: no near-zero layers
        param.data.add_(torch.randn_like(param) * 0.05)
    return save_checkpoint(str(tmp_path / "m.pt"), model, cfg, step=1)


def test_tiled_output_equals_whole_image_output_when_the_overlap_covers_the_receptive_field(model_path):
    model, _ = load_model(model_path)
    low_res = torch.rand(1, 3, 45, 38)
    whole = model(low_res)
    margin = model.receptive_margin()
    assert margin == 3  # (3 + 2 convolutions + the upsampling) / 2, rounded up
    tiled = upscale_tiled(model, low_res, 2, tile=16, margin=margin)
    assert (tiled - whole).abs().max() < 1e-5
    too_small = upscale_tiled(model, low_res, 2, tile=16, margin=1)
    assert (too_small - whole).abs().max() > 1e-3  # the check can fail: without context the seams differ


def test_at_x4_the_margin_covers_the_two_hr_pixels_the_upsampling_places_outside_the_lr_centres(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(dict(tiny_cfg, model="residual", num_blocks=1, scale=4)).eval()  # 3 convolutions
    for param in model.parameters():
        param.data.add_(torch.randn_like(param) * 0.05)
    low_res = torch.rand(1, 3, 37, 29)
    with torch.no_grad():
        whole = model(low_res)
        assert model.receptive_margin() == 2  # (3 + 4 // 2) / 4, rounded up; (3 + 1) / 4 = 1 is too little
        assert (upscale_tiled(model, low_res, 4, tile=12, margin=2) - whole).abs().max() < 1e-5
        assert (upscale_tiled(model, low_res, 4, tile=12, margin=1) - whole).abs().max() > 1e-3


def test_onnxruntime_tiles_equal_the_whole_image_bit_for_bit(model_path):
    """The model run by onnxruntime computes each output pixel in the same order wherever it lies in the image, so
    the tiles that upscale.py computes are the whole image's bit for bit (PyTorch's differ by float rounding)."""
    model, _ = load_model(model_path)
    runner = OnnxModel(model, threads=2)
    low_res = torch.from_numpy(photo_crops(45, 1)[0][:, :38]).permute(2, 0, 1)[None].float() / 255
    whole = runner(low_res)
    assert whole.shape == (1, 3, 90, 76) and (whole - model(low_res)).abs().max() < 1e-5
    assert torch.equal(upscale_tiled(runner, low_res, 2, tile=16, margin=runner.receptive_margin()), whole)
    too_small = upscale_tiled(runner, low_res, 2, tile=16, margin=1)
    assert (too_small - whole).abs().max() > 1e-3  # the check can fail: without context the seams differ


def test_on_a_cpu_onnxruntime_upscales_by_default_within_one_level_of_pytorch(model_path, tmp_path, monkeypatch):
    tiles = []

    class Counted(OnnxModel):
        def __call__(self, low_res):
            tiles.append(low_res.shape)
            return super().__call__(low_res)
    monkeypatch.setattr(upscale, "OnnxModel", Counted)
    Image.fromarray(photo_crops(45, 1)[0]).save(tmp_path / "photo.png")
    args = [f"checkpoint={model_path}", f"input={tmp_path / 'photo.png'}", "tile=16", "device=cpu"]
    [onnx_png] = upscale.main([*args, f"output={tmp_path / 'onnx.png'}"])
    assert len(tiles) == 9  # 3 x 3 tiles, all through onnxruntime
    [torch_png] = upscale.main([*args, f"output={tmp_path / 'torch.png'}", "onnxruntime=false"])
    assert len(tiles) == 9  # none: PyTorch ran them
    onnx_pixels, torch_pixels = (np.asarray(Image.open(path)).astype(int) for path in (onnx_png, torch_png))
    assert onnx_pixels.shape == (90, 90, 3) and np.abs(onnx_pixels - torch_pixels).max() <= 1
    assert (onnx_pixels == torch_pixels).mean() > 0.999


def test_self_ensemble_averages_the_8_turns_and_flips_back_in_place():
    identity_x2 = lambda x: x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # noqa: E731
    low_res = torch.rand(1, 3, 5, 7)
    torch.testing.assert_close(self_ensemble(identity_x2)(low_res), identity_x2(low_res))  # equivariant: itself

    def with_a_spike(x):  # not equivariant: +1 at the top-left output pixel, wherever the image was turned
        out = identity_x2(x).clone()
        out[..., 0, 0] += 1
        return out
    expected = identity_x2(low_res).clone()  # the 8 turns/flips bring the top-left pixel to each corner twice
    for row, column in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        expected[..., row, column] += 0.25
    torch.testing.assert_close(self_ensemble(with_a_spike)(low_res), expected)


def test_files_of_every_kind_are_written_as_x2_pngs(model_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = photo_crops(40, 1)[0]
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")  # gray.png's pixels in 16 bits
    written = upscale.main([f"checkpoint={model_path}", f"input={folder}", f"output={tmp_path / 'out'}", "tile=24"])
    modes = {os.path.basename(p): Image.open(p).mode for p in written}
    assert modes == {"deep.png": "L", "gray.png": "L", "rgb.png": "RGB", "rgba.png": "RGBA"}
    for path in written:
        assert Image.open(path).size == (80, 80)
    alpha = np.asarray(Image.open(tmp_path / "out" / "rgba.png"))[..., 3]
    assert (alpha == 200).all()
    deep, gray = (np.asarray(Image.open(tmp_path / "out" / n), dtype=int) for n in ("deep.png", "gray.png"))
    assert np.abs(deep - gray).max() <= 1 and gray.std() > 10  # read at full depth, not saturated by 8-bit scaling


def test_ensemble_option_and_single_file_default_output(model_path, tmp_path):
    Image.fromarray(photo_crops(20, 1)[0]).save(tmp_path / "small.png")
    [written] = upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'small.png'}", "ensemble=true"])
    assert written == str(tmp_path / "small_x2.png") and Image.open(written).size == (40, 40)
    [single] = upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'small.png'}", f"output={tmp_path / 'one.png'}"])
    assert not np.array_equal(np.asarray(Image.open(written)), np.asarray(Image.open(single)))  # 8 passes, not one


def test_bad_inputs_and_checkpoints_are_one_line_errors(model_path, tmp_path):
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(SystemExit, match="broken.png: cannot read image"):
        upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'broken.png'}"])
    with pytest.raises(SystemExit, match="no such file or folder"):
        upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'missing.png'}"])
    with pytest.raises(SystemExit, match="broken.png: not a checkpoint but a text file starting 'not an image'"):
        upscale.main([f"checkpoint={tmp_path / 'broken.png'}", f"input={tmp_path / 'broken.png'}"])
    with pytest.raises(SystemExit, match="give input=IMAGE_OR_FOLDER"):
        upscale.main([])


def test_the_default_checkpoint_is_the_final_model(model_path, tmp_path, monkeypatch):
    Image.fromarray(photo_crops(20, 1)[0]).save(tmp_path / "small.png")
    monkeypatch.setattr(checkpoints, "FINAL_MODEL", str(tmp_path / "final" / "model.pt"))
    with pytest.raises(SystemExit, match=r"final/model.pt: no such file yet \(it is written when"):
        upscale.main([f"input={tmp_path / 'small.png'}"])
    monkeypatch.setattr(checkpoints, "FINAL_MODEL", str(model_path))
    [written] = upscale.main([f"input={tmp_path / 'small.png'}"])
    assert Image.open(written).size == (40, 40)


@pytest.mark.slow
def test_a_decompression_bomb_gives_one_line_and_little_memory(model_path, tmp_path):
    from conftest import run_script, write_bomb_png

    bomb = write_bomb_png(tmp_path / "bomb.png")
    status, err, peak_mb = run_script("upscale.py", [f"checkpoint={model_path}", f"input={bomb}", "device=cpu"])
    assert status == 1 and err.strip() == (f"error: {bomb}: 30000x30000 px (900 megapixels) would hold 30.6 GB to "
                                          "upscale x2, above the 7.5 GB that max_pixels=100000000 allows; raise "
                                          "max_pixels to read it")
    assert peak_mb < 1500


@pytest.mark.parametrize("side, accepted", [(14143, True), (10392, True), (15500, False)])
def test_the_limit_is_what_upscaling_holds_read_from_the_header(tmp_path, side, accepted):
    """200 and 108 megapixel camera photos fit the default budget (their 8-bit x2 output and Pillow's copy of it,
    6.2 and 3.4 GB); 240 megapixels do not. Header-only files: nothing here is decoded."""
    from conftest import write_bomb_png

    path = write_bomb_png(tmp_path / "header.png", side=side, zeros=1)
    if accepted:
        assert upscale.check_size(path, 2, upscale.MAX_PIXELS) == side * side
    else:
        with pytest.raises(upscale.DataError, match=f"{side}x{side} px .* above the 7.5 GB that max_pixels="):
            upscale.check_size(path, 2, upscale.MAX_PIXELS)


def test_an_image_above_max_pixels_upscales_when_its_output_fits_the_budget(model_path, tmp_path):
    """max_pixels=1000 allows 75,000 bytes: a 40x40 RGB input holds 1600 x (6 + 4 x 7) = 54,400 and is upscaled
    (the readers' limit alone would refuse it), a 60x60 one would hold 122,400 and is refused in one line."""
    for side in (40, 60):
        Image.fromarray(photo_crops(side, 1)[0]).save(tmp_path / f"p{side}.png")
    [written] = upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'p40.png'}", "max_pixels=1000"])
    assert Image.open(written).size == (80, 80)
    with pytest.raises(SystemExit, match=r"p60.png: 60x60 px \(0 megapixels\) would hold 0.0 GB"):
        upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'p60.png'}", "max_pixels=1000"])
    page_args = [f"checkpoint={model_path}", f"input={tmp_path / 'p40.png'}", "max_pixels=1000",
                 f"output={tmp_path / 'paged.png'}", f"page={tmp_path / 'page'}"]
    with pytest.raises(SystemExit, match=r"p40.png: 40x40 px is above max_pixels=1000, and page= shows whole images"):
        upscale.main(page_args)  # the page reads the input whole: refused before the work, not after it
    assert not (tmp_path / "paged.png").exists()


def test_the_8_bit_tiled_output_equals_the_float_one_rounded(model_path):
    """upscale.py holds its output in 8 bits, rounded tile by tile from an 8-bit input converted a window at a
    time: the same pixels as rounding the float output of the whole image."""
    model, _ = load_model(model_path)
    image = torch.from_numpy(photo_crops(45, 1)[0]).permute(2, 0, 1)[None].contiguous()
    whole = model(image.float() / 255).clamp(0, 1).mul(255).round().byte()
    output = torch.zeros(90, 90, 3, dtype=torch.uint8)
    upscale_tiled(model, image, 2, tile=16, margin=model.receptive_margin(), output=output.permute(2, 0, 1)[None])
    assert (output.permute(2, 0, 1)[None].int() - whole.int()).abs().max() <= 1
    assert (output.permute(2, 0, 1)[None] == whole).float().mean() > 0.999


def test_a_phone_photo_comes_out_the_right_way_up_with_its_colour_profile(model_path, tmp_path):
    from PIL import ImageCms

    from conftest import write_exif_rotated_jpeg

    pixels = photo_crops(80, 1)[0][:60, :36]  # shown 36 wide and 60 tall
    path = write_exif_rotated_jpeg(tmp_path / "phone.jpg", pixels)
    with Image.open(path) as stored:
        assert stored.size == (60, 36)  # sideways on disk
        profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        stored.save(tmp_path / "phone_icc.jpg", exif=stored.getexif(), icc_profile=profile, dpi=(72, 72))
    out = upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'phone_icc.jpg'}", "device=cpu"])[0]
    with Image.open(out) as result:
        assert result.size == (72, 120)
        shown = np.asarray(result.convert("RGB").resize((36, 60)), dtype=float)  # as the viewer shows it, not turned
        assert np.abs(shown - pixels).mean() < np.abs(shown - np.rot90(pixels, 2)).mean() / 2
        assert result.info.get("icc_profile") == profile
        assert result.info["dpi"] == pytest.approx((144, 144), abs=0.01)


def test_every_file_of_the_bad_input_corpus_is_upscaled_or_refused_in_one_line(model_path, tmp_path):
    from test_dataset import make_bad_input_corpus

    expected = make_bad_input_corpus(tmp_path / "corpus")
    for name, outcome in expected.items():
        source = tmp_path / "corpus" / name
        upscaled = outcome == "rgb" or "too small" in outcome or "patch_size" in outcome  # any size works here
        try:
            out = upscale.main([f"checkpoint={model_path}", f"input={source}", f"output={tmp_path / 'out.png'}",
                                "device=cpu", "onnxruntime=false"])[0]  # the files are the subject, not the engine,
            # and onnxruntime's export would cost seconds for each of them
        except SystemExit as refused:
            message = str(refused.code)
            reason = {"zz_bomb.png": "would hold 30.6 GB to upscale x2", "loop.png": "no such file or folder",
                      "broken.png": "no such file or folder"}.get(name, outcome)
            assert not upscaled and "\n" not in message and message.startswith("error: ") and reason in message, (
                name, message)
            continue
        with Image.open(out) as result:
            shown = upscale.decode_image(str(source))  # as a viewer shows it
            assert result.size == (2 * shown.shape[-1], 2 * shown.shape[-2]), name
        assert upscaled, name


def test_a_read_only_output_folder_stops_before_the_work_in_one_line(model_path, tmp_path, read_only_dir):
    from conftest import refused_before

    Image.fromarray(photo_crops(20, 1)[0]).save(tmp_path / "small.png")
    out = read_only_dir.path / "small_x2.png"
    args = [f"checkpoint={model_path}", f"input={tmp_path / 'small.png'}", f"output={out}", "device=cpu"]
    status, err = refused_before(upscale, "upscale_file", "upscale.py", args, lambda: upscale.main(args),
                                 read_only_dir.mounted)
    assert status == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write {read_only_dir.path}: Read-only file system (") and " MB free " in err


def test_a_disk_that_fills_while_the_png_is_written_is_one_line(model_path, tmp_path, monkeypatch):
    import errno

    Image.fromarray(photo_crops(20, 1)[0]).save(tmp_path / "small.png")

    (tmp_path / "out.png").write_bytes(b"the previous output")

    def full(self, path, **options):  # half a PNG written, then the disk is full
        pathlib.Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(SystemExit, match=rf"^error: cannot write {tmp_path / 'out.png'}: No space left on device \("):
        upscale.main([f"checkpoint={model_path}", f"input={tmp_path / 'small.png'}", f"output={tmp_path / 'out.png'}"])
    assert (tmp_path / "out.png").read_bytes() == b"the previous output"  # whole, and no partial file beside it
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_two_inputs_that_would_write_one_output_are_refused_before_any_work(model_path, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "a.jpg"):
        Image.fromarray(photo_crops(20, 1)[0]).save(folder / name)
    with pytest.raises(SystemExit, match=r"^error: .*a\.(jpg|png) and .*a\.(jpg|png) would both be written to .*a\.png; rename"):
        upscale.main([f"checkpoint={model_path}", f"input={folder}", f"output={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_an_x4_checkpoint_writes_an_x4_image_named_so(tiny_cfg, tmp_path):
    cfg = dict(tiny_cfg, model="residual", num_blocks=1, scale=4)
    path = save_checkpoint(str(tmp_path / "x4.pt"), build_model(cfg), cfg, step=1)
    Image.fromarray(photo_crops(20, 1)[0]).save(tmp_path / "small.png")
    [written] = upscale.main([f"checkpoint={path}", f"input={tmp_path / 'small.png'}"])
    assert written == str(tmp_path / "small_x4.png") and Image.open(written).size == (80, 80)
