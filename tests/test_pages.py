"""pages.py and compare.html, the comparison page: written deterministically and atomically, its first view, and
driven in a real headless Chromium (Debian's chromium + chromium-driver, via selenium): the slider,
zoom without smoothing, panning, keyboard navigation, and no JavaScript error."""
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import compare
import pages
import upscale
from checkpoints import save_checkpoint
from conftest import photo_crops, write_folder
from dataset import SRDataset
from models import build_model

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# without these Chromium stalls on a closed network (update, sync and QUIC probes)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1000,800", "--force-device-scale-factor=1")
RED, BLUE, GREEN, YELLOW, MAGENTA, BLACK, WHITE = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0),
                                                   (255, 0, 255), (0, 0, 0), (255, 255, 255))


def checkpoint(tiny_cfg, tmp_path, name="m", **changes):
    torch.manual_seed(0)
    cfg = dict(tiny_cfg, run=name, **changes)
    return save_checkpoint(str(tmp_path / f"{name}.pt"), build_model(cfg), cfg, step=3)


def solid(colour, height=32, width=32):
    return torch.tensor(colour, dtype=torch.float32)[:, None, None].expand(3, height, width) / 255


def checkerboard(side=32):
    """Black and white single pixels: any smoothing of a magnified view shows as grey."""
    rows, cols = np.indices((side, side))
    return torch.from_numpy(((rows + cols) % 2).astype(np.float32))[None].expand(3, -1, -1).clone()


def synthetic_entries():
    """Two 'images' whose methods are known colours; the first has a checkerboard and a half-size 'LR' method."""
    return [{"name": "colours.png", "left": "red", "right": "blue", "focus": {"x": 8, "y": 8, "size": 16},
             "methods": [("red", solid(RED), {"psnr": 11.5, "ssim": 0.25}), ("blue", solid(BLUE), None),
                         ("checker", checkerboard(), None), ("green LR", solid(GREEN, 16, 16), None)]},
            {"name": "second.png", "left": "yellow", "right": "magenta", "focus": {"x": 0, "y": 0, "size": 24},
             "methods": [("yellow", solid(YELLOW, 24, 40), None), ("magenta", solid(MAGENTA, 24, 40), None)]}]


def folder_bytes(folder):
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def page_data(folder):
    text = open(os.path.join(folder, "index.html"), encoding="utf-8").read()
    return json.loads(re.search(r'<script id="page-data" type="application/json">(.*?)</script>', text, re.S).group(1))


def leftovers(parent):
    return [name for name in os.listdir(parent) if ".tmp" in name]


# ---- the page's files, without a browser ----

def test_the_focus_window_is_the_square_with_the_largest_mean_gain():
    gain = torch.zeros(64, 80)
    gain[20:36, 44:60] = 1.0
    assert pages.focus_window(gain, 16) == {"x": 44, "y": 20, "size": 16}


def test_the_detail_window_is_where_the_image_has_most_edges():
    hr = torch.full((3, 64, 96), 0.5)
    hr[:, 32:48, 16:32] = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))  # texture: edges
    hr[:, :, 80:] = 1.0  # one straight edge elsewhere: less than the texture
    assert pages.detail_window(hr, 16) == (32, 16)


def test_the_first_view_is_where_the_best_model_gains_most_over_bicubic(tiny_cfg):
    gain = torch.zeros(64, 96)
    gain[40:56, 64:80] = 1.0
    assert pages.focus_window(gain) == {"x": 64, "y": 40, "size": 16}

    class Perfect(torch.nn.Module):  # HR wherever the mask is set, bicubic elsewhere: gains only there
        scale = 2

        def forward(self, low_res):
            bicubic = pages.interpolate(low_res, 2, "bicubic")
            mask = torch.zeros_like(bicubic)
            mask[..., 24:40, 8:24] = 1
            return mask * self.high_res + (1 - mask) * bicubic

    dataset = SRDataset(tiny_cfg["eval_dir"], scale=2, train=False)
    model = Perfect()
    model.high_res = dataset[0][1][None]
    [entry, _] = pages.method_images(dataset, [("perfect", model)], "cpu")
    focus = entry["focus"]
    assert entry["right"] == "perfect" and focus["size"] == 16
    assert abs(focus["x"] - 8) <= 4 and abs(focus["y"] - 24) <= 4
    cropped = pages.crop_entry(entry, 20, 2)
    assert [tuple(image.shape[-2:]) for _, image, _ in cropped["methods"]][:3] == [(20, 20), (10, 10), (20, 20)]
    assert 0 <= cropped["focus"]["x"] <= 20 - 16 and cropped["methods"][4][2] == entry["methods"][4][2]


def test_a_failure_midway_leaves_the_previous_page_and_no_temporary_folder(tmp_path):
    out = tmp_path / "page"
    pages.write_page(str(out), "t", synthetic_entries())
    before = folder_bytes(out)

    def failing():
        yield synthetic_entries()[0]
        raise pages.PageError("broken on the second image")
    with pytest.raises(pages.PageError, match="broken on the second image"):
        pages.write_page(str(out), "t", failing())
    assert folder_bytes(out) == before and leftovers(tmp_path) == []
    mismatched = synthetic_entries()[:1]
    mismatched[0]["methods"].append(("odd", solid(RED, 32, 20), None))
    with pytest.raises(pages.PageError, match=r"colours.png: 'odd' is 20x32 px, neither 32x32 px"):
        pages.write_page(str(tmp_path / "new"), "t", mismatched)
    with pytest.raises(pages.PageError, match="no images to show"):
        pages.write_page(str(tmp_path / "new"), "t", [])
    assert sorted(os.listdir(tmp_path)) == ["page"]


def test_a_full_disk_while_the_page_is_written_is_one_line_and_keeps_the_previous_page(tmp_path, monkeypatch):
    """ENOSPC from Pillow's PNG writer (which names no file): the line names the page, the old page stays."""
    import errno

    out = tmp_path / "page"
    pages.write_page(str(out), "t", synthetic_entries())
    before = folder_bytes(out)

    def full_disk(image, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(pages, "save_png", full_disk)
    with pytest.raises(SystemExit) as stop:
        pages.write_page(str(out), "t", synthetic_entries())
    message = str(stop.value.code)
    assert message.startswith(f"error: cannot write {out}: No space left on device") and "\n" not in message
    assert folder_bytes(out) == before and leftovers(tmp_path) == []


def test_upscale_writes_the_page_for_ones_own_photo(tiny_cfg, tmp_path):
    ckpt = checkpoint(tiny_cfg, tmp_path)
    photo = write_folder(tmp_path / "photos", photo_crops(20, 2))
    upscale.main([f"checkpoint={ckpt}", f"input={photo}", f"output={tmp_path / 'x2'}", f"page={tmp_path / 'page'}",
                  "device=cpu"])
    data = page_data(tmp_path / "page")
    assert [image["name"] for image in data["images"]] == ["img00.png", "img01.png"]
    methods = data["images"][0]["methods"]
    assert [(m["name"], m["psnr"]) for m in methods] == [("input", None), ("bicubic", None),
                                                         ("m (basic, step 3)", None)]
    assert [Image.open(tmp_path / "page" / m["src"]).size for m in methods] == [(20, 20), (40, 40), (40, 40)]
    written = np.asarray(Image.open(tmp_path / "x2" / "img00.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "page" / methods[2]["src"])), written)
    photos = folder_bytes(photo)
    with pytest.raises(SystemExit, match="exists and is not a comparison page"):  # refused before the work
        upscale.main([f"checkpoint={ckpt}", f"input={photo}", f"page={photo}", "device=cpu"])
    assert folder_bytes(photo) == photos and not os.path.exists(tmp_path / "photos_x2") and leftovers(tmp_path) == []


# ---- in a real browser ----

def chromium_missing():
    """None where Debian's chromium and chromium-driver are there or could be installed (root, apt-get), else why not."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{CHROMIUM} or {CHROMEDRIVER} missing; installing Debian's chromium and chromium-driver needs root"
    done = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium "
                          "chromium-driver", shell=True, capture_output=True, text=True, timeout=1200)
    if done.returncode or not os.path.exists(CHROMEDRIVER):
        return f"could not install chromium and chromium-driver with apt-get: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = chromium_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def javascript_errors(driver):
    """Console errors and uncaught exceptions since the last call (the browser log is read once)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.fixture
def page(browser, tmp_path):
    """Opens a page folder from file:// once its images are decoded; the test fails on any JavaScript error."""
    javascript_errors(browser)

    def open_page(folder):
        browser.get("file://" + os.path.abspath(os.path.join(folder, "index.html")))
        wait_for_images(browser)
        return browser
    yield open_page
    assert javascript_errors(browser) == []


def wait_for_images(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return [...document.images].every((i) => i.complete && i.naturalWidth > 0)"))


def screenshot(driver):
    wait_for_images(driver)
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))


def rect(driver, element_id):
    box = driver.execute_script(f"return document.getElementById('{element_id}').getBoundingClientRect().toJSON()")
    return {key: round(box[key]) for key in ("left", "top", "width", "height")}


def split_x(driver):
    box = rect(driver, "split")
    return box["left"] + box["width"] // 2


def colour_at(pixels, x, y):
    return tuple(int(v) for v in pixels[y, x])


def keys(driver, *pressed):
    from selenium.webdriver.common.action_chains import ActionChains

    for key in pressed:
        ActionChains(driver).send_keys(key).perform()


def test_the_slider_shows_the_left_method_left_and_the_right_method_right(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pages.write_page(str(tmp_path / "page"), "synthetic", synthetic_entries())
    driver = page(tmp_path / "page")
    image, view = rect(driver, "left-img"), rect(driver, "view")
    y = view["top"] + view["height"] // 2 + 60  # below the line's handle
    x = split_x(driver)
    assert x == view["left"] + view["width"] // 2  # starts in the middle
    assert image["left"] < x - 40 and x + 40 < image["left"] + image["width"]
    pixels = screenshot(driver)
    assert colour_at(pixels, x - 30, y) == RED and colour_at(pixels, x + 30, y) == BLUE
    assert driver.find_element(By.ID, "left-tag").text == "red 11.50 dB / 0.2500"
    assert driver.find_element(By.ID, "right-tag").text == "blue"

    ActionChains(driver).click_and_hold(driver.find_element(By.ID, "split")).move_by_offset(-100, 0).release().perform()
    moved = split_x(driver)
    assert abs(moved - (x - 100)) <= 2
    pixels = screenshot(driver)
    assert colour_at(pixels, moved - 10, y) == RED and colour_at(pixels, moved + 10, y) == BLUE
    assert colour_at(pixels, x - 30, y) == BLUE  # what was left of the line is now the right method

    keys(driver, "\ue014", "\ue014", "\ue014")  # ArrowRight: 5 % of the view's width each
    assert abs(split_x(driver) - (moved + 0.15 * view["width"])) <= 2
    keys(driver, "\ue012")  # ArrowLeft
    assert abs(split_x(driver) - (moved + 0.10 * view["width"])) <= 2
    pixels = screenshot(driver)
    assert colour_at(pixels, split_x(driver) - 10, y) == RED and colour_at(pixels, split_x(driver) + 10, y) == BLUE


def runs_of(row):
    """Lengths of the runs of equal pixels along a row of RGB pixels."""
    changes = np.flatnonzero(np.any(row[1:] != row[:-1], axis=1)) + 1
    return np.diff(np.concatenate([[0], changes, [len(row)]]))


def test_zoom_magnifies_pixels_without_smoothing_and_pans_both_sides_together(page, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    pages.write_page(str(tmp_path / "page"), "synthetic", synthetic_entries())
    driver = page(tmp_path / "page")
    Select(driver.find_element(By.ID, "left")).select_by_index(2)  # checker
    Select(driver.find_element(By.ID, "right")).select_by_index(3)  # the half-size green, magnified the same
    keys(driver, "0")  # fit: 32 px into the view

    def checker_zoom():
        """The magnification of the checkerboard left of the line, after checking that it has exactly two colours."""
        image, pixels = rect(driver, "left-img"), screenshot(driver)
        top, left = max(image["top"], rect(driver, "view")["top"]), max(image["left"], 0)
        region = pixels[top + 40:top + 100, left + 2:split_x(driver) - 14]  # below the method's name
        colours = {tuple(c) for c in region.reshape(-1, 3)}
        assert colours == {BLACK, WHITE}, sorted(colours)[:5]  # smoothing would add greys
        middle = runs_of(region[len(region) // 2])[1:-1]  # whole blocks only
        assert len(middle) >= 2 and middle.max() - middle.min() <= 1
        return image["width"] / 32, middle.mean()

    zoom, block = checker_zoom()
    assert zoom > 8 and abs(block - zoom) <= 1
    keys(driver, "-")
    zoom_out, block = checker_zoom()
    assert zoom_out == pytest.approx(zoom / 2, abs=0.05) and abs(block - zoom_out) <= 1
    view = driver.find_element(By.ID, "view")
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(view, -100, 0), 0, -100).perform()
    zoom_in, block = checker_zoom()
    assert zoom_in == pytest.approx(zoom_out * 1.25, abs=0.05) and abs(block - zoom_in) <= 1
    assert rect(driver, "left-img") == rect(driver, "right-img")  # one zoom for both sides
    assert colour_at(screenshot(driver), split_x(driver) + 10, rect(driver, "view")["top"] + 200) == GREEN

    keys(driver, "+", "+")  # larger than the view: now it can be panned
    before = rect(driver, "left-img")
    ActionChains(driver).move_to_element_with_offset(view, -200, 50).click_and_hold().move_by_offset(60, 40) \
        .release().perform()
    after = rect(driver, "left-img")
    assert (after["left"] - before["left"], after["top"] - before["top"]) == (60, 40)
    assert rect(driver, "right-img") == after
    checker_zoom()


def test_keys_step_through_the_images_and_keep_the_split(page, tmp_path):
    from selenium.webdriver.common.by import By

    pages.write_page(str(tmp_path / "page"), "synthetic", synthetic_entries())
    driver = page(tmp_path / "page")

    def shown():
        pixels, x = screenshot(driver), split_x(driver)
        image = rect(driver, "left-img")
        y = image["top"] + image["height"] // 2 + 60  # below the line's handle
        return (driver.find_element(By.ID, "name").text, driver.find_element(By.ID, "counter").text,
                colour_at(pixels, x - 20, y), colour_at(pixels, x + 20, y))

    assert shown() == ("colours.png", "1 / 2", RED, BLUE)
    keys(driver, "\ue012")  # ArrowLeft: the split stays where it was put
    x = split_x(driver)
    keys(driver, "n")
    assert shown() == ("second.png", "2 / 2", YELLOW, MAGENTA) and split_x(driver) == x
    keys(driver, "n")  # wraps around
    assert shown() == ("colours.png", "1 / 2", RED, BLUE)
    keys(driver, "\ue00f")  # PageUp
    assert shown()[:2] == ("second.png", "2 / 2")
    keys(driver, "p")
    assert shown()[:2] == ("colours.png", "1 / 2")


def test_a_page_from_compare_on_a_checkpoint_opens_and_a_script_error_would_fail(page, tiny_cfg, tmp_path, browser):
    out = tmp_path / "page"
    compare.main([f"checkpoint={checkpoint(tiny_cfg, tmp_path)}", f"eval_dir={tiny_cfg['eval_dir']}", f"out={out}",
                  "device=cpu"])
    driver = page(out)
    assert rect(driver, "left-img")["width"] > 0
    assert "bicubic" in driver.find_element("id", "left-tag").text
    assert "m (basic, step 3)" in driver.find_element("id", "right-tag").text
    # the check that every browser test ends with: a broken page is caught
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    text = (broken / "index.html").read_text(encoding="utf-8")
    (broken / "index.html").write_text(text.replace("show(0);", "show(0); undefinedFunction();"), encoding="utf-8")
    browser.get("file://" + str(broken / "index.html"))
    wait_for_images(browser)
    assert any("undefinedFunction" in message for message in javascript_errors(browser))
