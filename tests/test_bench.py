import pytest

import bench
import speed
import system
from models import BasicSRModel
from speed import training_flops


def tiny_bench_args(tiny_cfg):
    """bench.py's arguments for a one-step run of a one-block model on the tiny data set."""
    return [f"data_dir={tiny_cfg['data_dir']}", f"eval_dir={tiny_cfg['eval_dir']}", "num_blocks=1", "channels=8",
            "patch_size=32", "batch_size=4", "bench_steps=1", "num_workers=0", "device=cpu"]


def test_training_flops_match_the_count_by_hand():
    # forward of a 64->64 3x3 conv on 16 patches of 64x64: 2 * 9 * 64 * 64 * 16 * 4096 flops
    inner = 2 * 9 * 64 * 64 * 16 * 4096
    outer = 2 * 9 * 3 * 64 * 16 * 4096
    expected = 2 * outer + 10 * 3 * inner + 3 * outer  # first layer: no input gradient
    assert training_flops(BasicSRModel(), 16, 64) == expected


@pytest.mark.slow
def test_bench_runs_every_measurement(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(bench, "BF16_CHECK_STEPS", 2)
    result = bench.main([*tiny_bench_args(tiny_cfg), "amp=bf16"])
    out = capsys.readouterr().out
    for line in ("P1  full loop (ours, batched on the device) / pure step throughput", "P2  default pure step (",
                 "literal handout pipeline", "of fp32 peak", "bf16 check, 2 steps"):
        assert line in out
    assert {"ours, DataLoader", "handout", "ours, batched on the device"} < set(result["full"])
    assert [name for name in result["full"] if name.startswith("pure step (")]  # P1's reference, timed in turns
    assert len(result["pure"]) == 5


def test_bf16_variants_are_skipped_where_the_cpu_has_no_bf16_instructions(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(system, "cpu_has", lambda flag: False)  # an AVX2 laptop
    result = bench.main(tiny_bench_args(tiny_cfg))
    out = capsys.readouterr().out
    assert "bf16 variants skipped" in out and "bf16 check" not in out
    assert not [name for name in result["pure"] if "bf16" in name]


@pytest.mark.parametrize("cpuinfo", [None, "processor\t: 0\nBogoMIPS\t: 50.00\n"])  # none (macOS); Arm: no clock
def test_the_cpu_peak_is_unknown_where_cpuinfo_gives_no_clock(cpuinfo, tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        fake.write_text(cpuinfo)
    monkeypatch.setattr(system, "CPUINFO", str(fake))
    assert speed.cpu_peak_flops() == (None, f"unknown: no clock in {fake}")
    fake.write_text("cpu MHz\t\t: 2000.000\ncpu MHz\t\t: 2500.000\n")  # the fastest core's clock
    peak, derivation = speed.cpu_peak_flops()
    assert peak > 0 and " x 2500 MHz x " in derivation


def test_bench_prints_its_times_without_a_share_of_an_unknown_peak(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(system, "cpu_has", lambda flag: False)
    monkeypatch.setattr(bench, "cpu_peak_flops", lambda: (None, "unknown: no clock in /proc/cpuinfo"))
    bench.main(tiny_bench_args(tiny_cfg))
    out = capsys.readouterr().out
    assert "CPU fp32 FMA peak unknown: no clock in /proc/cpuinfo" in out and "of fp32 peak" not in out
    assert "x naive" in out
