import pytest

import bench
import system
from models import BasicSRModel
from speed import training_flops


def test_training_flops_match_the_count_by_hand():
    # forward of a 64->64 3x3 conv on 16 patches of 64x64: 2 * 9 * 64 * 64 * 16 * 4096 flops
    inner = 2 * 9 * 64 * 64 * 16 * 4096
    outer = 2 * 9 * 3 * 64 * 16 * 4096
    expected = 2 * outer + 10 * 3 * inner + 3 * outer  # first layer: no input gradient
    assert training_flops(BasicSRModel(), 16, 64) == expected


@pytest.mark.slow
def test_bench_runs_every_measurement(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(bench, "BF16_CHECK_STEPS", 2)
    args = [f"data_dir={tiny_cfg['data_dir']}", f"eval_dir={tiny_cfg['eval_dir']}", "num_blocks=1", "channels=8",
            "patch_size=32", "batch_size=4", "bench_steps=1", "num_workers=0", "device=cpu", "amp=bf16"]
    result = bench.main(args)
    out = capsys.readouterr().out
    for line in ("P1  full loop (ours, batched on the device) / pure step throughput", "P2  default pure step (",
                 "literal handout pipeline", "of fp32 peak", "bf16 check, 2 steps"):
        assert line in out
    assert {"ours, DataLoader", "handout", "ours, batched on the device"} < set(result["full"])
    assert [name for name in result["full"] if name.startswith("pure step (")]  # P1's reference, timed in turns
    assert len(result["pure"]) == 5


def test_bf16_variants_are_skipped_where_the_cpu_has_no_bf16_instructions(tiny_cfg, capsys, monkeypatch):
    monkeypatch.setattr(system, "cpu_has", lambda flag: False)  # an AVX2 laptop
    args = [f"data_dir={tiny_cfg['data_dir']}", f"eval_dir={tiny_cfg['eval_dir']}", "num_blocks=1", "channels=8",
            "patch_size=32", "batch_size=4", "bench_steps=1", "num_workers=0", "device=cpu"]
    result = bench.main(args)
    out = capsys.readouterr().out
    assert "bf16 variants skipped" in out and "bf16 check" not in out
    assert not [name for name in result["pure"] if "bf16" in name]
