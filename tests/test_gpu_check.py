"""gpu_check.py's small CPU version end to end, with a tiny model (the GPU version is the same code, larger)."""
import pytest

import gpu_check


@pytest.mark.slow
def test_the_check_runs_on_a_cpu_and_says_so(tiny_data, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "cpu_peak_flops", lambda: (None, "unknown: no clock in /proc/cpuinfo"))  # Arm, macOS
    summary = gpu_check.main([f"data_dir={tiny_data['train']}", f"eval_dir={tiny_data['eval']}", "device=cpu",
                              "channels=8", "num_blocks=1", "batch_size=4", "patch_size=32"])
    assert "small CPU version" in capsys.readouterr().out
    assert [line[0] for line in summary] == ["1", "2", "3", "4", "5"]
    assert "fp32 FMA peak unknown: no clock in /proc/cpuinfo" in summary[0]
    assert "weights differ" in summary[1]  # the bf16 run computed in bf16
    assert "bit-identical weights" in summary[2] and "bit-identical to the uninterrupted run" in summary[3]
    assert "800x600" in summary[4]
