import pytest

import bench
from models import BasicSRModel


def test_training_flops_match_the_count_by_hand():
    # forward of a 64->64 3x3 conv on 16 patches of 64x64: 2 * 9 * 64 * 64 * 16 * 4096 flops
    inner = 2 * 9 * 64 * 64 * 16 * 4096
    outer = 2 * 9 * 3 * 64 * 16 * 4096
    expected = 2 * outer + 10 * 3 * inner + 3 * outer  # first layer: no input gradient
    assert bench.training_flops(BasicSRModel(), 16, 64) == expected
    assert expected / 16 == pytest.approx(9.13e9, rel=0.01)  # the ~9.3 GFLOP per patch of the issue


def test_bench_runs_every_measurement(tiny_cfg, capsys):
    args = [f"data_dir={tiny_cfg['data_dir']}", "num_blocks=1", "channels=8", "patch_size=32", "batch_size=4",
            "bench_steps=1", "num_workers=0", "device=cpu"]
    result = bench.main(args)
    out = capsys.readouterr().out
    for line in ("P1  full loop / pure step throughput", "P2  pure step speed-up", "literal handout pipeline",
                 "of peak"):
        assert line in out
    assert set(result["full"]) == {"ours", "handout"} and len(result["pure"]) == 3
