import itertools
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dataset
from conftest import photo_crops, shared_folder, write_bomb_png, write_exif_rotated_jpeg, write_folder
from batches import DeviceBatches, TrainSampler, hue_shift, jitter_batch
from dataset import DataError, SRDataset, decode_image, degrade, to_float


def test_training_pairs_have_the_right_shapes_and_range(tiny_data):
    ds = SRDataset(tiny_data["train"], patch_size=32)
    assert len(ds) == 4
    low_res, high_res = ds[0]
    assert high_res.shape == (3, 32, 32) and low_res.shape == (3, 16, 16)
    assert high_res.dtype == low_res.dtype == torch.float32
    assert 0 <= high_res.min() and high_res.max() <= 1 and high_res.std() > 0.01


def test_lr_is_the_bilinear_downscale_of_the_jittered_hr(tiny_data):
    low_res, high_res = SRDataset(tiny_data["train"], patch_size=32, jitter=0.2)[(1, 123)]
    # independent of torchvision's Resize: antialiased bilinear interpolation in torch itself
    expected = F.interpolate(high_res[None], size=(16, 16), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(low_res, expected, atol=1e-5, rtol=0)


def test_hr_is_a_crop_of_the_image_when_jitter_is_off(tiny_data):
    image = to_float(decode_image(os.path.join(tiny_data["train"], "img00.png")))
    _, high_res = SRDataset(tiny_data["train"], patch_size=32, jitter=0)[(0, 7)]
    windows = image.unfold(1, 32, 1).unfold(2, 32, 1)  # every 32x32 window: 3 x H' x W' x 32 x 32
    matches = (windows == high_res[:, None, None]).flatten(3).all(-1).all(0)
    assert matches.sum() == 1


def test_a_seeded_sample_is_reproducible_and_seeds_differ(tiny_data):
    ds = SRDataset(tiny_data["train"], patch_size=32)
    first, again, other = ds[(2, 99)], ds[(2, 99)], ds[(2, 100)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[1], other[1])


def test_sampler_resumes_the_exact_stream_and_visits_every_image_each_epoch():
    full = list(itertools.islice(iter(TrainSampler(5, seed=3)), 23))
    resumed = list(itertools.islice(iter(TrainSampler(5, seed=3, start=12)), 11))
    assert resumed == full[12:]
    for epoch in range(4):
        assert sorted(index for index, _ in full[epoch * 5:(epoch + 1) * 5]) == list(range(5))
    assert len({seed for _, seed in full}) == len(full)
    assert full != list(itertools.islice(iter(TrainSampler(5, seed=4)), 23))


def test_dataloader_batches_are_the_same_with_and_without_workers(tiny_data):
    ds = SRDataset(tiny_data["train"], patch_size=32)

    def first_batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=TrainSampler(len(ds), 0), num_workers=workers)
        return [hr for _, (_, hr) in zip(range(3), loader)]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(2)))


def test_eval_mode_returns_whole_images_cropped_to_the_scale(tmp_path):
    folder = write_folder(tmp_path / "eval", [photo_crops(41, 1)[0][:, :37]])
    low_res, high_res = SRDataset(folder, train=False)[0]
    assert high_res.shape == (3, 40, 36) and low_res.shape == (3, 20, 18)
    assert torch.equal(high_res, to_float(decode_image(os.path.join(folder, "img00.png")))[:, :40, :36])  # top-left
    torch.testing.assert_close(low_res, degrade(high_res))
    assert torch.equal(SRDataset(folder, train=False)[0][0], low_res)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest", "nearest_last", "box"])
def test_degrade_halves_each_side(method):
    assert degrade(torch.rand(2, 3, 10, 14), 2, method).shape == (2, 3, 5, 7)
    assert degrade(torch.rand(3, 11, 15), 2, method).shape == (3, 5, 7)  # odd sides: the last row/column dropped


def test_nearest_and_nearest_last_sample_half_a_pixel_either_side_and_box_averages_at_the_centre():
    ramp = torch.arange(8.0).repeat(8, 1)[None] / 8  # brightness rising to the right, 1/8 a pixel
    assert torch.equal(degrade(ramp, 2, "nearest")[0, 0], torch.tensor([0.0, 2, 4, 6]) / 8)  # half a pixel left
    assert torch.equal(degrade(ramp, 2, "nearest_last")[0, 0], torch.tensor([1.0, 3, 5, 7]) / 8)  # half right
    box = degrade(ramp, 2, "box")[0, 0]
    assert torch.equal(box, torch.tensor([0.5, 2.5, 4.5, 6.5]) / 8)  # a linear ramp: exactly the block's centre
    torch.testing.assert_close(box[1:3], degrade(ramp, 2, "bilinear")[0, 0, 1:3])  # where bilinear samples
    checker = torch.tensor([[0.0, 1], [1, 0]]).repeat(4, 4)[None]  # the finest pattern: box blurs it to grey
    assert torch.equal(degrade(checker, 2, "box"), torch.full((1, 4, 4), 0.5))
    assert torch.equal(degrade(checker, 2, "nearest"), torch.zeros(1, 4, 4))  # point samples alias it


def make_odd_formats(folder):
    """The same 20x30 picture in formats and modes users have; returns {file name: expected RGB array}."""
    rgb = photo_crops(30, 1)[0][:20]
    gray = rgb[..., 0]
    os.makedirs(folder, exist_ok=True)
    saved = {
        "rgb.bmp": (Image.fromarray(rgb), rgb),
        "rgb.tif": (Image.fromarray(rgb), rgb),
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2)),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full_like(gray, 128)])), rgb),
    }
    palette = Image.fromarray(rgb).convert("P")
    saved["palette.png"] = (palette, np.asarray(palette.convert("RGB")))
    for name, (pil, _) in saved.items():
        pil.save(os.path.join(folder, name))
    return {name: expected for name, (_, expected) in saved.items()}


def test_odd_formats_become_rgb_in_unit_range(tmp_path):
    expected = make_odd_formats(tmp_path)
    for name, pixels in expected.items():
        image = to_float(decode_image(str(tmp_path / name)))
        assert image.shape == (3, 20, 30), name
        torch.testing.assert_close(image, torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255, msg=name)


def test_16_bit_png_is_scaled_to_unit_range(tmp_path):
    pixels = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    image = to_float(decode_image(str(tmp_path / "deep.png")))
    assert image.shape == (3, 20, 30)
    assert image.min() == 0 and image.max() == 1
    torch.testing.assert_close(image[0], torch.from_numpy(pixels.astype(np.float32) / 65535))


def test_folder_listing_skips_non_images_and_hidden_files(tmp_path):
    folder = write_folder(tmp_path / "d", photo_crops(40, 2))
    for junk in (".DS_Store", "Thumbs.db", "README.txt", ".hidden.png"):
        (tmp_path / "d" / junk).write_text("junk")
    assert [os.path.basename(p) for p in dataset.list_images(folder)] == ["img00.png", "img01.png"]


def test_several_folders_separated_by_commas_give_the_files_of_each_in_turn(tmp_path):
    first, second = (write_folder(tmp_path / name, photo_crops(40, count)) for name, count in (("b", 2), ("a", 1)))
    assert dataset.list_images(f"{first},{second}") == [*dataset.list_images(first), *dataset.list_images(second)]
    assert len(SRDataset(f"{first},{second}", patch_size=32)) == 3
    with pytest.raises(DataError, match="nope: no such folder"):
        dataset.list_images(f"{first},{tmp_path / 'nope'}")


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        SRDataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        SRDataset(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="not-a-folder.png: no such folder"):
        SRDataset(write_folder(tmp_path / "x", photo_crops(40, 1)) + "/img00.png/not-a-folder.png")


def test_an_image_given_for_a_folder_is_named_as_a_file(tmp_path):
    """data_dir=one image instead of its folder: the line says it is a file, not that it does not exist."""
    image = os.path.join(write_folder(tmp_path / "x", photo_crops(40, 1)), "img00.png")
    with pytest.raises(DataError) as caught:
        SRDataset(image)
    assert str(caught.value) == f"{image}: is a file, not a folder; a folder of images is wanted here"


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is text, not a PNG")
    with pytest.raises(DataError, match="bad.png: cannot read image"):
        to_float(decode_image(str(bad)))


def test_images_smaller_than_the_crop_stop_or_are_skipped_by_policy(tmp_path, capsys):
    folder = write_folder(tmp_path / "d", [photo_crops(80, 1)[0], photo_crops(20, 1)[0]])
    message = r"img01.png: 20x20 px is too small: it needs at least the 32x32 px training crop \(patch_size=32\)"
    with pytest.raises(DataError, match=message):
        SRDataset(folder, patch_size=32)
    ds = SRDataset(folder, patch_size=32, bad_files="skip")
    assert [os.path.basename(p) for p in ds.files] == ["img00.png"]
    assert "warning: skipped " in capsys.readouterr().err


def test_standard_sets_read_as_rgb_including_grayscale_bridge():
    folder = shared_folder("Set14")
    ds = SRDataset(folder, train=False)
    assert len(ds) == 14
    bridge = ds.files.index(os.path.join(folder, "bridge.png"))
    low_res, high_res = ds[bridge]
    assert high_res.shape[0] == 3 and torch.equal(high_res[0], high_res[1])


def test_dataset_script_writes_the_handouts_check_images(tiny_data, tmp_path, capsys):
    dataset.main([f"data_dir={tiny_data['train']}", f"runs_dir={tmp_path}", "patch_size=32"])
    assert "Dataset contains 4 image(s)" in capsys.readouterr().out
    lr_png = np.asarray(Image.open(tmp_path / "dataset_check" / "lr_image.png"))
    hr_png = np.asarray(Image.open(tmp_path / "dataset_check" / "hr_image.png"))
    assert lr_png.shape == (16, 16, 3) and hr_png.shape == (32, 32, 3)


def make_bad_input_corpus(folder):
    """Every kind of file users drop into data folders; returns {name: expected outcome}.

    Outcome "rgb": read as 3-channel float in [0, 1]; otherwise a fragment of the one-line reason.
    """
    rgb = photo_crops(80, 1)[0]
    os.makedirs(folder, exist_ok=True)
    path = lambda name: os.path.join(folder, name)  # noqa: E731
    Image.fromarray(rgb).save(path("good.png"))
    Image.fromarray(rgb[..., 0]).save(path("gray.png"))
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(path("rgba.png"))
    Image.fromarray(rgb).convert("P").save(path("palette.png"))
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(path("deep16.png"))
    Image.fromarray(rgb).convert("CMYK").save(path("cmyk.jpg"))
    Image.fromarray(rgb).save(path("picture.bmp"))
    Image.fromarray(rgb).save(path("picture.tiff"))
    Image.fromarray(rgb).save(path("picture.ppm"))
    Image.fromarray(rgb[..., 0]).save(path("gray.pgm"))
    Image.fromarray(rgb[:20, :20]).save(path("small.png"))
    open(path("empty.png"), "wb").close()
    with open(path("good.png"), "rb") as f:
        head = f.read(300)
    with open(path("truncated.png"), "wb") as f:
        f.write(head)
    with open(path("text.png"), "w") as f:
        f.write("not an image\n")
    for junk in (".DS_Store", "Thumbs.db", "README.txt"):
        with open(path(junk), "w") as f:
            f.write("junk")
    Image.fromarray(rgb).save(path("picture.webp"), lossless=True)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(path("animated.gif"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    write_exif_rotated_jpeg(path("phone.jpg"), rgb)
    Image.fromarray(rgb[..., 1].astype(np.float32) / 255, mode="F").save(path("float.tiff"))
    Image.fromarray(rgb[..., 1].astype(np.float32), mode="F").save(path("float_0_255.tiff"))  # not in [0, 1]
    Image.fromarray(rgb[..., 2].astype(np.uint16) * 257).save(path("deep16.tiff"))
    Image.fromarray(rgb[:1, :1]).save(path("tiny1x1.png"))
    Image.fromarray(rgb[:2, :2]).save(path("tiny2x2.png"))
    os.mkdir(path("folder.png"))  # a directory with an image's name: not an image, ignored
    os.symlink("loop.png", path("loop.png"))  # a link to itself
    os.symlink("missing.png", path("broken.png"))  # a link to nothing
    for name in ("with space.png", "größe.png", "-dash.png"):
        Image.fromarray(rgb).save(path(name))
    write_bomb_png(path("zz_bomb.png"))
    return {"good.png": "rgb", "gray.png": "rgb", "rgba.png": "rgb", "palette.png": "rgb", "deep16.png": "rgb",
            "cmyk.jpg": "rgb", "picture.bmp": "rgb", "picture.tiff": "rgb", "picture.ppm": "rgb", "gray.pgm": "rgb",
            "small.png": "patch_size=32",
            "empty.png": "cannot read image", "truncated.png": "cannot read image",
            "text.png": "cannot read image", "picture.webp": "rgb", "animated.gif": "rgb", "phone.jpg": "rgb",
            "float.tiff": "rgb", "float_0_255.tiff": "expected [0, 1]", "deep16.tiff": "rgb",
            "tiny1x1.png": "1x1 px is too small", "tiny2x2.png": "2x2 px is too small",
            "loop.png": "Too many levels of symbolic links", "broken.png": "No such file or directory",
            "with space.png": "rgb", "größe.png": "rgb", "-dash.png": "rgb",
            "zz_bomb.png": "30000x30000 px (900 megapixels) is above max_pixels=100000000"}


def test_bad_input_corpus_every_file_is_converted_or_named(tmp_path, capsys):
    expected = make_bad_input_corpus(tmp_path / "corpus")
    ds = SRDataset(str(tmp_path / "corpus"), patch_size=32, bad_files="skip")
    kept = {os.path.basename(p) for p in ds.files}
    assert kept == {name for name, outcome in expected.items() if outcome == "rgb"}
    warnings = capsys.readouterr().err.strip().splitlines()
    for name, outcome in expected.items():
        if outcome == "rgb":
            image = ds.images[ds.files.index(str(tmp_path / "corpus" / name))]
            low_res, high_res = ds[(ds.files.index(str(tmp_path / "corpus" / name)), 1)]
            assert image.shape[0] == 3 and high_res.shape == (3, 32, 32) and 0 <= high_res.min() <= high_res.max() <= 1
        else:
            lines = [w for w in warnings if f"{name}:" in w]
            assert len(lines) == 1 and outcome in lines[0] and lines[0].startswith("warning: skipped "), name
    assert len(warnings) == 10  # junk files and the folder named folder.png are not even looked at


def test_an_image_too_small_for_evaluation_is_named_with_the_size_it_needs(tmp_path):
    folder = write_folder(tmp_path / "eval", [photo_crops(40, 1)[0], photo_crops(20, 1)[0]])
    with pytest.raises(DataError, match=r"20x20 px is too small: it needs at least 22x22 px for evaluation \(SSIM's "
                                        r"11x11 window on the x2 LR image\)"):
        SRDataset(str(folder), train=False)


def test_bad_files_error_policy_stops_at_the_first_bad_file(tmp_path):
    make_bad_input_corpus(tmp_path / "corpus")
    with pytest.raises(DataError, match=r"broken.png: cannot read image .*\(bad_files=skip leaves such files out\)$"):
        SRDataset(str(tmp_path / "corpus"), patch_size=32)


def test_a_folder_with_no_readable_image_stops_before_work(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("text")
    with pytest.raises(DataError, match="no usable image"):
        SRDataset(str(tmp_path / "bad"), bad_files="skip")


def test_16_bit_and_cmyk_convert_to_the_right_values(tmp_path):
    make_bad_input_corpus(tmp_path)
    good = to_float(decode_image(str(tmp_path / "good.png")))
    deep = to_float(decode_image(str(tmp_path / "deep16.png")))
    torch.testing.assert_close(deep, good[0].expand(3, -1, -1))  # v*257/65535 == v/255
    deep_tiff = to_float(decode_image(str(tmp_path / "deep16.tiff")))  # through Pillow's integer path
    torch.testing.assert_close(deep_tiff, good[2].expand(3, -1, -1))
    cmyk = to_float(decode_image(str(tmp_path / "cmyk.jpg")))
    assert (cmyk - good).abs().mean() < 0.05  # JPEG is lossy, but the colours survive the CMYK round trip


def test_ranks_split_each_global_batch_of_the_same_stream():
    single = iter(TrainSampler(7, seed=1, start=6, batch_size=6))
    ranks = [iter(TrainSampler(7, seed=1, start=6, rank=r, world_size=2, batch_size=3)) for r in (0, 1)]
    for _ in range(4):  # four global batches
        expected = [next(single) for _ in range(6)]
        assert [next(ranks[0]) for _ in range(3)] + [next(ranks[1]) for _ in range(3)] == expected


def test_matlab_imresize_matches_values_worked_out_by_hand():
    """imresize(1:4, 0.5) and imresize(1:4, 2) from MATLAB's algorithm, by hand: Keys cubic (a = -0.5),
    kernel widened to 8 taps when halving, symmetric borders; e.g. the first half-size sample is
    (-3/256)*3 + (-9/256)*2 + (29/256)*1 + (111/256)*1 + (111/256)*2 + (29/256)*3 + (-9/256)*4 + (-3/256)*4."""
    row = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]], dtype=torch.float64).expand(1, 4, 4)
    torch.testing.assert_close(dataset.imresize_matlab(row, 0.5)[0, 0], torch.tensor([1.4609375, 3.5390625],
                                                                                   dtype=torch.float64))
    up = dataset.imresize_matlab(row, 2)[0, 0]
    assert up.shape == (8,)
    torch.testing.assert_close(up[:2], torch.tensor([0.90625, 1.1796875], dtype=torch.float64))
    torch.testing.assert_close(up, up.flip(0).neg() + 5)  # symmetric about the centre, like the input
    flat = torch.full((3, 30, 21), 0.25)
    torch.testing.assert_close(dataset.imresize_matlab(flat, 1 / 3), torch.full((3, 10, 7), 0.25))


def test_scale_augment_adds_each_image_downscaled_by_each_factor_after_the_originals(tiny_data):
    plain = SRDataset(tiny_data["train"], patch_size=32)
    augmented = SRDataset(tiny_data["train"], patch_size=32, downscaled=(0.5, 0.375))
    assert len(augmented) == 4 + 4 + 0  # 80 x 0.375 = 30 px is under the 32 px crop: left out
    assert augmented.files[:4] == plain.files and augmented.files[4].endswith("img00.png (x0.5)")
    assert all(torch.equal(a, b) for a, b in zip(augmented.images, plain.images))
    small = augmented.images[4]
    assert small.shape == (3, 40, 40) and small.dtype == torch.uint8
    expected = dataset.imresize_matlab(plain.images[0].double() / 255, 0.5).mul(255).round()
    assert torch.equal(small.double(), expected.clamp(0, 255))
    low_res, high_res = augmented[(5, 3)]  # a copy trains like any image
    assert high_res.shape == (3, 32, 32) and low_res.shape == (3, 16, 16)


def test_16_bit_images_are_downscaled_on_their_own_scale():
    ramp = torch.linspace(0, 65535, 40).round().to(torch.int32)
    image = (ramp.view(1, 1, 40) + 0 * ramp.view(1, 40, 1)).expand(3, 40, 40).to(torch.uint16)
    files, images = dataset.with_downscaled_copies(["a.png"], [image], (0.5,), 8)
    assert files == ["a.png", "a.png (x0.5)"]
    assert images[1].dtype == torch.uint16 and images[1].shape == (3, 20, 20)
    expected = dataset.imresize_matlab(image.double() / 65535, 0.5).mul(65535).round().clamp(0, 65535)
    assert torch.equal(images[1].to(torch.int32), expected.to(torch.int32))  # on the 16-bit scale, not 8-bit
    assert int(images[1].to(torch.int32).max()) > 60000


def test_bicubic_matlab_degradation_is_rounded_to_8_bits():
    hr = torch.rand(3, 24, 24)
    low_res = degrade(hr, 2, "bicubic_matlab")
    assert low_res.shape == (3, 12, 12)
    torch.testing.assert_close(low_res * 255, (low_res * 255).round(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("jitter, degradation, augment, workers", [
    (0.2, "bilinear", "none", 0), (0.5, "bicubic", "dihedral", 0), (0.0, "nearest", "none", 0),
    (0.0, "bicubic_matlab", "dihedral", 1), (0.2, "bilinear", "dihedral", 1)])
def test_device_batches_equal_the_reference_dataset_for_the_same_sample_seeds(tiny_data, tmp_path, jitter, degradation,
                                                                             augment, workers):
    """The batched (GPU) path must make the same LR/HR pairs as SRDataset: same crops, jitter and LR."""
    # images of different sizes, so the flat buffer's offsets and strides are exercised
    folder = write_folder(tmp_path / "mixed", [*photo_crops(80, 2), *photo_crops(120, 2)[1:], photo_crops(97, 1)[0]])
    reference = SRDataset(folder, patch_size=32, jitter=jitter, degradation=degradation, augment=augment)
    sampler = TrainSampler(len(reference), seed=3, start=40)
    batches = DeviceBatches(reference.images, sampler, 8, "cpu", 32, jitter=jitter, degradation=degradation,
                            augment=augment, batches_per_chunk=2, workers=workers)  # crosses a chunk boundary
    samples = iter(TrainSampler(len(reference), seed=3, start=40))
    for _ in range(3):
        low_res, high_res = next(batches)
        expected = [reference[next(samples)] for _ in range(8)]
        assert torch.equal(high_res, torch.stack([hr for _, hr in expected]))  # bit for bit
        assert torch.equal(low_res, torch.stack([lr for lr, _ in expected]))


def test_16_bit_grayscale_trains_beside_8_bit_rgb_in_both_batch_paths(tmp_path):
    """A 16-bit gray PNG (mode I;16) beside an 8-bit RGB one: the batched path scales both to [0, 1] as SRDataset
    does (it once divided 16-bit values by 255, and one folder of both could not be concatenated)."""
    folder = tmp_path / "bits"
    folder.mkdir()
    rgb, gray = photo_crops(64, 2)
    Image.fromarray(rgb).save(folder / "a_rgb8.png")
    Image.fromarray(np.asarray(Image.fromarray(gray).convert("L"), dtype=np.uint16) * 257).save(folder / "b_gray16.png")
    assert Image.open(folder / "b_gray16.png").mode == "I;16"
    reference = SRDataset(str(folder), patch_size=32, jitter=0.0, augment="dihedral")
    assert [image.dtype for image in reference.images] == [torch.uint8, torch.uint16]
    batches = DeviceBatches(reference.images, TrainSampler(len(reference), seed=0), 4, "cpu", 32, jitter=0.0,
                            augment="dihedral")
    samples = iter(TrainSampler(len(reference), seed=0))
    for _ in range(2):
        low_res, high_res = next(batches)
        expected = [reference[next(samples)] for _ in range(4)]
        assert high_res.max() <= 1 and high_res.max() > 0.5
        assert torch.allclose(high_res, torch.stack([hr for _, hr in expected]), atol=1e-6, rtol=0)
        assert torch.allclose(low_res, torch.stack([lr for lr, _ in expected]), atol=1e-6, rtol=0)


def test_device_batches_are_the_same_whatever_the_chunk_size(tiny_data):
    """Making 8 batches at once is only faster: the batches are bit-identical to those made one by one."""
    reference = SRDataset(tiny_data["train"], patch_size=32, jitter=0.3)
    one_by_one, chunked = (DeviceBatches(reference.images, TrainSampler(len(reference), seed=1), 4, "cpu", 32,
                                         jitter=0.3, batches_per_chunk=chunk) for chunk in (1, 3))
    for _ in range(7):
        assert all(torch.equal(a, b) for a, b in zip(next(one_by_one), next(chunked)))


def test_jitter_batch_applies_each_samples_own_order():
    """Brightness then contrast differs from contrast then brightness once values clip; each sample keeps its order."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    factors = torch.tensor([[1.4, 0.6, 1.0, 0.0]] * 2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])
    out = jitter_batch(images.clone(), factors, order)
    tf = dataset.transforms.functional
    assert torch.allclose(out[0], tf.adjust_contrast(tf.adjust_brightness(images[0], 1.4), 0.6), atol=1e-6)
    assert torch.allclose(out[1], tf.adjust_brightness(tf.adjust_contrast(images[1], 0.6), 1.4), atol=1e-6)
    other_order = jitter_batch(images[:1].clone(), factors[:1], order[1:])
    assert not torch.allclose(out[0], other_order[0])  # the two orders really differ on these values
    assert torch.equal(jitter_batch(images.clone(), factors, order, host_free=True), out)  # the GPU way


def test_hue_shift_is_torchvisions_adjust_hue_per_image_bit_for_bit():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    images[0, :, :4, :4] = 0.5  # gray pixels (no hue)
    images[1, 0], images[1, 1] = images[1, 2], images[1, 2]  # ties between channels
    images[2:4] = (images[2:4] * 7).round() / 7  # few levels, as in 8-bit photos: many ties of every kind
    shifts = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.33, 0.5])
    expected = torch.stack([dataset.transforms.functional.adjust_hue(image, float(shift))
                            for image, shift in zip(images, shifts)])
    assert torch.equal(hue_shift(images, shifts), expected)


def test_dihedral_augment_turns_or_mirrors_the_same_crop_and_keeps_the_stream(tiny_data):
    """augment=dihedral draws after the crop and jitter, so each sample is one of the 8 symmetries of the sample
    made without it; over many samples all 8 occur."""
    plain = SRDataset(tiny_data["train"], patch_size=32, jitter=0.2)
    turned = SRDataset(tiny_data["train"], patch_size=32, jitter=0.2, augment="dihedral")
    seen = set()
    for seed in range(40):
        _, reference = plain[(seed % len(plain), seed)]
        low_res, high_res = turned[(seed % len(plain), seed)]
        matches = [k for k in range(8) if torch.equal(dataset.dihedral(reference, k), high_res)]
        assert matches, seed
        seen.add(matches[0])
        assert torch.equal(low_res, degrade(high_res, 2, "bilinear"))  # LR made from the turned crop
    assert seen == set(range(8))


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    """EXIF orientation applied (a phone's portrait photo), float and 16-bit TIFF to the right values, an
    animated GIF's first frame: the same pixels as the plain PNG of the same picture."""
    rgb = photo_crops(80, 1)[0][:, :48]  # 80 tall, 48 wide: the orientation shows in the shape
    write_exif_rotated_jpeg(tmp_path / "phone.jpg", rgb)
    phone = decode_image(str(tmp_path / "phone.jpg"))
    assert phone.shape == (3, 80, 48)
    assert (phone.float() - torch.from_numpy(rgb).permute(2, 0, 1).float()).abs().mean() < 4  # JPEG is lossy
    Image.fromarray(rgb[..., 1].astype(np.float32) / 255, mode="F").save(tmp_path / "float.tiff")
    expected = torch.from_numpy(rgb[..., 1]).float() / 255
    torch.testing.assert_close(to_float(decode_image(str(tmp_path / "float.tiff")))[0], expected, atol=1e-4, rtol=0)
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = decode_image(str(tmp_path / "animated.gif"))
    assert first.shape == (3, 80, 48)
    palette = torch.from_numpy(np.array(Image.open(tmp_path / "animated.gif").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(first, palette)


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = write_bomb_png(tmp_path / "bomb.png")
    assert os.path.getsize(path) < 100_000

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")
    monkeypatch.setattr(dataset.torchvision.io, "read_image", no_decoding)
    monkeypatch.setattr(dataset, "_decode_with_pillow", no_decoding)
    with pytest.raises(DataError, match=r"bomb.png: 30000x30000 px \(900 megapixels\) is above max_pixels=100000000"):
        decode_image(path)
    with pytest.raises(DataError, match="above max_pixels=1000"):
        decode_image(str(tmp_path / "bomb.png"), max_pixels=1000)


def test_a_streamed_file_that_changed_since_the_folder_was_read_is_one_line_saying_so(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(tmp_path / "a.png")
    paths, images = dataset.read_folder(str(tmp_path), 22, "evaluation", stream=True)
    (tmp_path / "a.png").write_text("no longer an image")
    with pytest.raises(DataError, match=r"a\.png: cannot read image .*\(it was readable when the folder was read\)$"):
        images[0]
