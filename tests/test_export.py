import copy
import os
import re

import onnx
import pytest
import torch
import torch.nn.functional as F

import export
import checkpoints
from checkpoints import load_model, save_checkpoint
from models import ONNX_OPSET, build_model, onnx_session, run_onnx, to_onnx


def tiny_checkpoint(tiny_cfg, folder, model):
    torch.manual_seed(0)
    cfg = dict(tiny_cfg, model=model, num_blocks=2)
    return save_checkpoint(str(folder / "tiny" / "model.pt"), build_model(cfg), cfg, step=1)


@pytest.fixture
def checkpoint(tiny_cfg, tmp_path):
    return tiny_checkpoint(tiny_cfg, tmp_path, "residual")


@pytest.mark.parametrize("model", ["basic", "residual"])
def test_the_file_takes_any_size_and_computes_what_pytorch_computes(model, tiny_cfg, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tiny_cfg, tmp_path, model)
    out = export.main([f"checkpoint={checkpoint}", f"out={tmp_path / 'tiny.onnx'}"])
    printed = capsys.readouterr().out
    differences = [float(d) for d in re.findall(r"largest \|onnxruntime - PyTorch\| = (\S+)\n", printed)]
    assert len(differences) == len(export.CHECK_SIZES) == 2 and max(differences) <= export.TOLERANCE, printed
    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    assert [opset.version for opset in proto.opset_import if opset.domain == ""] == [ONNX_OPSET]
    [given], [result] = proto.graph.input, proto.graph.output
    assert (given.name, result.name) == ("low_res", "high_res")
    assert given.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [dim.dim_param or dim.dim_value for dim in given.type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(dims[axis], str) for axis in (0, 2, 3)), dims  # N, H and W free
    model, _ = load_model(checkpoint)
    with open(out, "rb") as f:
        written = f.read()
    session = onnx_session(written, threads=1)
    for size in ((2, 1, 1), (3, 5, 2), (1, 33, 20)):  # sizes the export and the check never saw, 1 px included
        low_res = torch.rand(size[0], 3, *size[1:])
        torch.testing.assert_close(run_onnx(session, low_res), model(low_res).detach(), atol=1e-5, rtol=0)
    export.main([f"checkpoint={checkpoint}", f"out={out}"])
    with open(out, "rb") as f:
        assert f.read() == written  # the same bytes on rerun
    assert capsys.readouterr().out.split("wrote")[0] == printed.split("wrote")[0]  # and the same parity


def test_the_bilinear_upsampling_inside_is_pytorchs_at_odd_sizes():
    """A residual model whose last convolution is zero is its bilinear upsampling alone: the file's Resize must
    compute align_corners=False (half-pixel centres) as PyTorch does, which differs from align_corners=True."""
    model = build_model({"model": "residual", "num_blocks": 1, "channels": 4, "scale": 2}).eval()
    for param in model.body[-1].parameters():
        torch.nn.init.zeros_(param)
    session = onnx_session(to_onnx(model), threads=1)
    for height, width in ((1, 1), (3, 5), (7, 2), (1, 9), (97, 131)):
        low_res = torch.rand(1, 3, height, width)
        expected = F.interpolate(low_res, scale_factor=2, mode="bilinear", align_corners=False)
        exported = run_onnx(session, low_res)
        torch.testing.assert_close(exported, expected, atol=1e-6, rtol=0)
        if height * width > 1:  # the check can fail: the corner-aligned grid is another image
            corners = F.interpolate(low_res, scale_factor=2, mode="bilinear", align_corners=True)
            assert (exported - corners).abs().max() > 1e-2


def test_a_file_that_differs_from_pytorch_is_refused_in_one_line_and_not_written(checkpoint, tmp_path, monkeypatch,
                                                                                  capsys):
    def corner_aligned(model):  # an exporter that got the upsampling wrong
        twin = copy.deepcopy(model)
        twin.upsample.align_corners = True
        return to_onnx(twin)
    monkeypatch.setattr(export, "to_onnx", corner_aligned)
    out = tmp_path / "wrong.onnx"
    with pytest.raises(SystemExit) as refused:
        export.main([f"checkpoint={checkpoint}", f"out={out}"])
    assert re.fullmatch(rf"error: {re.escape(str(out))} not written: onnxruntime's output differs from PyTorch's by "
                        r"\S+ on a 97x131 photo, above the fp32 tolerance 0.0001", refused.value.code)
    assert float(re.search(r"by (\S+) on", refused.value.code).group(1)) > 10 * export.TOLERANCE
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no file, no temporary file
    assert "wrote" not in capsys.readouterr().out


def test_missing_foreign_and_broken_checkpoints_are_one_line_errors(checkpoint, tmp_path):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    out = tmp_path / "x.onnx"
    (tmp_path / "run_without_model").mkdir()
    (tmp_path / "broken.pt").write_bytes(open(checkpoint, "rb").read()[:3000])  # truncated
    for name, message in (("missing.pt", "no such file"), ("foreign.pt", "not a checkpoint of this repo \\(expected keys"),
                          ("text.pt", "not a checkpoint but a text file starting 'not a checkpoint'"),
                          ("broken.pt", "not a readable checkpoint \\("),
                          ("run_without_model", "is a folder without a model.pt")):
        with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(tmp_path / name))}: {message}") as refused:
            export.main([f"checkpoint={tmp_path / name}", f"out={out}"])
        assert "\n" not in refused.value.code
    assert not out.exists()


def test_an_unwritable_out_stops_before_the_work_in_one_line(checkpoint, read_only_dir):
    from conftest import refused_before

    args = [f"checkpoint={checkpoint}", f"out={read_only_dir.path / 'x.onnx'}"]
    status, err = refused_before(export, "to_onnx", "export.py", args, lambda: export.main(args), read_only_dir.mounted)
    assert status == 1 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write {read_only_dir.path}: Read-only file system (") and " MB free " in err


def test_the_default_is_the_final_model_written_as_final_onnx(tmp_path, monkeypatch, tiny_cfg):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(checkpoints, "FINAL_MODEL", str(tmp_path / "final" / "model.pt"))
    with pytest.raises(SystemExit, match=r"final/model.pt: no such file yet \(it is written when"):
        export.main([])
    save_checkpoint(str(tmp_path / "final" / "model.pt"), build_model(tiny_cfg), tiny_cfg, step=1)
    assert export.main([]) == "final.onnx" and os.path.getsize(tmp_path / "final.onnx") > 0
    with pytest.raises(SystemExit, match=r"config error: protocol= is not a setting of this script.*checkpoint, out$"):
        export.main(["protocol=standard"])  # evaluate.py's key beside out=
