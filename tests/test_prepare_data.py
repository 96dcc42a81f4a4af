import csv
import errno
import hashlib
import http.server
import io
import os
import threading

import numpy as np
import pytest
from PIL import Image

import prepare_data
from conftest import photo_crops, shared_folder
from dataset import SRDataset

COMMIT = "0" * 40
SETS = {"T91": 91, "BSD200": 200, "Set5": 5, "Set14": 14, "B100": 100}  # the images of each standard set


def test_embedded_data_is_real_photos_and_reruns_leave_files_alone(tmp_path, capsys):
    args = [f"data_dir={tmp_path / 'train'}", f"eval_dir={tmp_path / 'eval'}"]
    prepare_data.main(args)
    train = sorted(os.listdir(tmp_path / "train"))
    evals = sorted(os.listdir(tmp_path / "eval"))
    assert len(train) == len(prepare_data.DEMO_TRAIN) and len(evals) == len(prepare_data.DEMO_EVAL)
    assert not set(train) & set(evals)
    astronaut = np.asarray(Image.open(tmp_path / "eval" / "astronaut.png"))
    assert astronaut.shape == (512, 512, 3) and astronaut.std() > 30  # a photograph, not a flat image
    stamps = {name: os.stat(tmp_path / "train" / name).st_mtime_ns for name in train}
    prepare_data.main(args)
    assert stamps == {name: os.stat(tmp_path / "train" / name).st_mtime_ns for name in train}
    assert len(SRDataset(str(tmp_path / "train"))) == len(train)  # every photo is large enough to crop


def encoded(pixels, fmt):
    """`pixels` as a file's bytes; a BMP with no resolution in its header, as T91's sources are."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"dpi": (0, 0)} if fmt == "BMP" else {}))
    return out.getvalue()


class Server:
    """A real HTTP server on 127.0.0.1 serving {url path: bytes}; `broken` {url path: 404 | 500 | "cut"} answers
    with that status, or sends half the bytes of a full Content-Length and closes. `requests` counts the GETs."""

    def __init__(self, files):
        self.files, self.broken, self.requests = dict(files), {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append(path)
                how = server.broken.get(path, 200 if path in server.files else 404)
                if how in (404, 500):
                    self.send_error(how)
                    return
                content = server.files[path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content[:len(content) // 2] if how == "cut" else content)
                if how == "cut":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(prepare_data.StandardFile._fields)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """Three photo crops pinned in a manifest like code/standard_sets.tsv and served like their URLs: two PNG
    sources in set 'Tiny' and a BMP source (as T91's are) in set 'Bmp'; `copy` holds their PNGs as a local source."""
    crops = photo_crops(40, 3)
    sources = [("Tiny", "a.png", "PNG", crops[0]), ("Tiny", "b.png", "PNG", crops[1]), ("Bmp", "c.png", "BMP", crops[2])]
    rows, served = [], {}
    for set_name, name, fmt, pixels in sources:
        content = encoded(pixels, fmt)
        url_path = f"owner/repo/{COMMIT}/{set_name.lower()}/{name[:-4]}.{fmt.lower()}"
        size, pixel_hash = prepare_data.pixels_sha256(content)
        rows.append([set_name, name, url_path, len(content), hashlib.sha256(content).hexdigest(), size, pixel_hash])
        served[url_path] = content
        os.makedirs(tmp_path / "copy" / set_name, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "copy" / set_name / name)
    monkeypatch.setattr(prepare_data, "MANIFEST", write_manifest(tmp_path / "pinned.tsv", rows))
    server = Server(served)
    yield type("Pinned", (), {"server": server, "rows": rows, "crops": crops, "copy": tmp_path / "copy",
                              "root": tmp_path / "data", "served": served})
    server.close()


def standard(pinned, *extra):
    return prepare_data.main(["standard", f"data_root={pinned.root}", f"data_url={pinned.server.url}",
                              "sets=Tiny,Bmp", *extra])


def refusal(pinned, *extra):
    with pytest.raises(SystemExit) as stop:
        standard(pinned, *extra)
    assert isinstance(stop.value.code, str) and "\n" not in stop.value.code
    return stop.value.code


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)


def test_download_checks_writes_png_and_a_second_run_downloads_nothing(pinned, capsys):
    assert standard(pinned) == {"Tiny": 2, "Bmp": 1}
    assert files_under(pinned.root) == ["Bmp/c.png", "Tiny/a.png", "Tiny/b.png"]  # no download or temporary left
    assert (pinned.root / "Tiny" / "a.png").read_bytes() == pinned.served[pinned.rows[0][2]]  # a PNG as served
    with Image.open(pinned.root / "Bmp" / "c.png") as png:  # the BMP source converted, same pixels
        assert png.format == "PNG" and np.array_equal(np.asarray(png), pinned.crops[2])
    assert len(pinned.server.requests) == 3
    stamps = {name: os.stat(pinned.root / name).st_mtime_ns for name in files_under(pinned.root)}
    standard(pinned)
    assert len(pinned.server.requests) == 3  # nothing fetched again
    assert stamps == {name: os.stat(pinned.root / name).st_mtime_ns for name in files_under(pinned.root)}
    assert "0 new" in capsys.readouterr().out


def test_a_changed_or_missing_file_is_fetched_again_and_only_it(pinned):
    standard(pinned)
    changed = np.array(pinned.crops[0])
    changed[5, 5] ^= 1  # one pixel, one bit
    Image.fromarray(changed).save(pinned.root / "Tiny" / "a.png")
    os.remove(pinned.root / "Bmp" / "c.png")
    standard(pinned)
    assert pinned.server.requests[3:] == [pinned.rows[0][2], pinned.rows[2][2]]
    with Image.open(pinned.root / "Tiny" / "a.png") as png:
        assert np.array_equal(np.asarray(png), pinned.crops[0])


def test_a_download_whose_hash_differs_names_the_file_and_both_hashes_and_keeps_nothing(pinned, monkeypatch):
    monkeypatch.setattr(prepare_data, "RETRIES", 0)
    url_path, expected = pinned.rows[1][2], pinned.rows[1][4]
    pinned.server.files[url_path] = encoded(pinned.crops[0], "PNG")  # another image under b's URL
    line = refusal(pinned)
    assert url_path in line and expected in line and hashlib.sha256(pinned.server.files[url_path]).hexdigest() in line
    assert files_under(pinned.root) == ["Tiny/a.png"]  # the file before it kept, nothing of b


@pytest.mark.parametrize("status", [404, 500])
def test_a_server_error_is_one_line_with_the_status_and_keeps_nothing(pinned, monkeypatch, status):
    monkeypatch.setattr(prepare_data, "RETRIES", 0)
    pinned.server.broken[pinned.rows[0][2]] = status
    line = refusal(pinned)
    assert f"answered {status}" in line and pinned.rows[0][2] in line
    assert files_under(pinned.root) == []


def test_a_transfer_cut_off_midway_is_retried_then_one_line_and_nothing_half_written(pinned, monkeypatch):
    monkeypatch.setattr(prepare_data, "RETRIES", 1)
    pinned.server.broken[pinned.rows[2][2]] = "cut"
    line = refusal(pinned)
    assert "failed 2 times" in line and pinned.rows[2][2] in line
    assert pinned.server.requests.count(pinned.rows[2][2]) == 2
    assert files_under(pinned.root) == ["Tiny/a.png", "Tiny/b.png"]
    del pinned.server.broken[pinned.rows[2][2]]  # the server recovers: the next run fetches only what is missing
    standard(pinned)
    assert files_under(pinned.root) == ["Bmp/c.png", "Tiny/a.png", "Tiny/b.png"]


def test_no_network_says_to_use_a_local_copy(pinned, monkeypatch):
    monkeypatch.setattr(prepare_data, "RETRIES", 0)
    pinned.server.close()  # nothing listens on its port any more
    line = refusal(pinned)
    assert "cannot connect" in line and "source=" in line


def test_a_local_copy_is_checked_by_its_pixels(pinned):
    standard(pinned, f"source={pinned.copy}")  # c.png is a PNG copy of the BMP source: the same pixels pass
    assert pinned.server.requests == []
    assert files_under(pinned.root) == ["Bmp/c.png", "Tiny/a.png", "Tiny/b.png"]
    changed = np.array(pinned.crops[1])
    changed[0, 0] ^= 1
    Image.fromarray(changed).save(pinned.copy / "Tiny" / "b.png")
    os.remove(pinned.root / "Tiny" / "b.png")
    line = refusal(pinned, f"source={pinned.copy}")
    assert str(pinned.copy / "Tiny" / "b.png") in line and "not the pinned image" in line
    assert not (pinned.root / "Tiny" / "b.png").exists()


def test_a_local_copy_may_hold_the_sources_as_downloaded_by_hand(pinned):
    os.remove(pinned.copy / "Bmp" / "c.png")
    (pinned.copy / "Bmp" / "c.bmp").write_bytes(pinned.served[pinned.rows[2][2]])  # T91/t1.bmp as its URL serves it
    standard(pinned, f"source={pinned.copy}")
    with Image.open(pinned.root / "Bmp" / "c.png") as png:
        assert png.format == "PNG" and np.array_equal(np.asarray(png), pinned.crops[2])
    os.remove(pinned.copy / "Bmp" / "c.bmp")
    os.remove(pinned.root / "Bmp" / "c.png")
    line = refusal(pinned, f"source={pinned.copy}")
    assert "no such file" in line and "c.png or c.bmp" in line


def test_a_read_only_data_root_stops_before_any_download(pinned, read_only_dir):
    pinned.root = read_only_dir.path / "data"
    line = refusal(pinned)
    assert line.startswith(f"error: cannot write {pinned.root}") and "Read-only" in line
    assert pinned.server.requests == []


def test_a_full_disk_is_one_line_naming_the_image_and_leaves_no_partial_file(pinned, monkeypatch):
    real_replace = os.replace

    def full_at_b(source, target):
        if str(target).endswith("b.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", full_at_b)
    line = refusal(pinned)
    assert line.startswith(f"error: cannot write {pinned.root / 'Tiny' / 'b.png'}: No space left on device")
    assert files_under(pinned.root) == ["Tiny/a.png"]


def test_an_unknown_set_no_set_or_a_missing_source_is_refused_in_one_line(pinned, tmp_path):
    line = refusal(pinned, "sets=Set6")
    assert "unknown set 'Set6'" in line and "Tiny" in line
    assert "names no set" in refusal(pinned, "sets=")
    assert "no such folder" in refusal(pinned, f"source={tmp_path / 'nowhere'}")
    assert not pinned.root.exists()


def test_the_pinned_manifest_matches_the_local_standard_sets(tmp_path):
    """code/standard_sets.tsv against ../shared/data: every PNG source byte for byte, T91's PNGs by their pixels;
    then the whole path from that copy: 410 checked images in data_root."""
    root = os.path.dirname(shared_folder("Set5"))
    files = prepare_data.read_manifest(list(SETS))
    assert len(files) == 410
    for file in files:
        path = os.path.join(root, file.set, file.file)
        if file.url_path.endswith(".png"):
            with open(path, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == file.sha256, path
        else:
            assert prepare_data.pixels_sha256(path) == (file.size, file.pixels_sha256), path
    counts = prepare_data.main(["standard", f"source={root}", f"data_root={tmp_path / 'data'}"])
    assert counts == SETS
    assert len(files_under(tmp_path / "data")) == 410


@pytest.mark.slow
def test_the_standard_sets_through_http_as_their_pinned_urls_serve_them(tmp_path):
    """The real manifest over a local HTTP server laid out like raw.githubusercontent.com, serving each pinned
    source's bytes (T91's BMPs rebuilt from the PNGs here: 24-bit, no resolution, as the sources are)."""
    root = os.path.dirname(shared_folder("Set5"))
    files = prepare_data.read_manifest(list(SETS))
    served = {}
    for file in files:
        path = os.path.join(root, file.set, file.file)
        if file.url_path.endswith(".bmp"):
            with Image.open(path) as pil:
                served[file.url_path] = encoded(np.asarray(pil), "BMP")
        else:
            with open(path, "rb") as f:
                served[file.url_path] = f.read()
        assert hashlib.sha256(served[file.url_path]).hexdigest() == file.sha256, file.url_path
    server = Server(served)
    try:
        counts = prepare_data.main(["standard", f"data_url={server.url}", f"data_root={tmp_path}"])
    finally:
        server.close()
    assert counts == SETS and len(server.requests) == 410
    for file in files:
        assert prepare_data.pixels_sha256(str(tmp_path / file.set / file.file))[1] == file.pixels_sha256


def test_a_disk_that_fills_during_a_download_is_one_line_and_a_second_process_has_its_own_folder(pinned, monkeypatch):
    import errno

    import pooch
    folders = []

    def full(self, name, *args, **kwargs):
        folders.append(str(self.abspath))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.abspath, name))
    monkeypatch.setattr(pooch.Pooch, "fetch", full)
    assert refusal(pinned).startswith(f"error: cannot write {pinned.root}: No space left on device")
    refusal(pinned)
    assert folders[0] != folders[1] and not os.path.exists(folders[0])  # each run's own downloads, removed after
