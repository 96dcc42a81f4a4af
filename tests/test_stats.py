import math

import pytest

import stats


def test_trend_compares_the_last_fifth_with_the_fifth_before_and_says_noisy_where_it_cannot_tell():
    steps = list(range(500, 10001, 500))
    rising = [20 + 0.1 * i for i in range(len(steps))]
    gain, se, verdict = stats.trend(steps, rising)
    assert gain == pytest.approx(0.4) and se == pytest.approx(math.sqrt(2 * 0.1 ** 2 * 5 / 3 / 4))
    assert verdict == "rising"
    assert stats.trend(steps, [30.0 + 0.001 * (i % 2) for i in range(len(steps))])[2] == "flat"
    noisy_but_flat = [30.0 + (0.5 if i % 2 else 0.0) for i in range(len(steps))]
    assert stats.trend(steps, noisy_but_flat)[::2] == (0.0, "noisy")  # no power: not "flat"
    assert stats.trend_text(steps, noisy_but_flat).endswith(" dB, no detectable trend (noisy)")  # the text's wording
    noisy_and_rising_a_little = [v + 0.02 * i for i, v in enumerate(noisy_but_flat)]  # 0.08 dB within 2 se
    gain, se, verdict = stats.trend(steps, noisy_and_rising_a_little)
    assert gain == pytest.approx(0.08) and gain < 2 * se and verdict == "noisy"
    assert math.isnan(stats.trend([500], [30.0])[0])


def test_signed_numbers_never_print_minus_zero():
    assert [stats.signed(v) for v in (0.126, -0.051, -0.004, 0.0)] == ["+0.13", "\u22120.05", "0.00", "0.00"]
    assert stats.signed_pm(-0.001, 0.004) == "0.00\xa0±\xa00.004" and stats.signed_pm(0.5, 0.0) == "+0.50\xa0±\xa00.00"
    assert stats.pm([35.031, 35.032, 35.034]) == "35.03\xa0±\xa00.002"  # an sd under 0.005: its first digit, not 0.00
    assert stats.uncertainty(0.00003) == "0.00003" and stats.uncertainty(0.0123) == "0.01"


def test_a_paired_difference_is_the_mean_and_standard_error_over_the_images():
    after, before = [{"psnr": v} for v in (31.0, 32.0, 33.5)], [{"psnr": v} for v in (30.0, 31.0, 32.0)]
    # differences 1, 1, 1.5: mean 1.1667, sd 0.2887, se 0.1667
    assert stats.paired(after, before) == "+1.17\xa0±\xa00.17"
    assert stats.pm([1.0, 2.0, 3.0]) == "2.00\xa0±\xa01.00" and stats.pm([]) == "—"
    assert stats.spread([0.1234, 0.2]) == "0.12–0.20" and stats.spread([0.2, 0.2001]) == "0.20" and stats.spread([]) == "—"
    assert stats.spread([-0.3, 0.2], 1) == "\u22120.3 to 0.2"  # a minus sign, and no '−0.3–0.2'
    assert [stats.number(v) for v in (-0.05, -0.001, 1.234)] == ["\u22120.05", "0.00", "1.23"]
    assert stats.spread([-0.001, 0.2]) == "0.00–0.20" and stats.pm([-1.0, -3.0]) == "\u22122.00\xa0±\xa01.41"


def test_ends_average_the_first_and_the_last_window_of_steps():
    steps = list(range(10, 5001, 10))
    first, last = stats.ends(steps, [1.0 if s < 510 else 3.0 if s > 4500 else 100.0 for s in steps])
    assert (first, last) == (1.0, 3.0)
    assert stats.ends([1, 2, 3], [2.0, 4.0, 6.0], window=2) == (3.0, 5.0)
    assert all(math.isnan(x) for x in stats.ends([], []))  # a run that logged nothing yet


def test_learning_rates_are_written_as_the_text_writes_them():
    assert [stats.rate(lr) for lr in (1e-2, 1e-3, 5e-4, 1e-4, 2e-4, 1e-6)] == ["1e-2", "1e-3", "5e-4", "1e-4", "2e-4", "1e-6"]
    assert stats.rate(1.5e-4) == "0.00015" and stats.rate(2.5e-4) == "0.00025"


def test_level_order_puts_the_highest_level_first_and_a_run_without_validations_last():
    levels = {"diverged": [], "low": [20.0, 21.0], "high": [31.0, 30.0], "middle": [25.0]}
    assert sorted(levels, key=lambda name: stats.level_order(levels[name])) == ["high", "middle", "low", "diverged"]
    assert sorted(["diverged", "low"], key=lambda name: stats.level_order(levels[name])) == ["low", "diverged"]
