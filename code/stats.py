"""How the report summarises runs and comparisons: a run's level (mean ± sd of its last validations), paired
differences over the images of a set, the trend test of a validation curve, and numbers as the text prints them."""
import math
import statistics

PM, MINUS = "\u00a0±\u00a0", "\u2212"  # "a ± b" kept on one line; a minus sign, not a hyphen
TREND_FRACTION, TREND_DB = 0.2, 0.05  # the trend test: the last 20% of the steps against the 20% before


def mean_sd(values):
    """(mean, sample standard deviation); sd 0 for one value, both NaN for none."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def level_order(values):
    """A sort key for runs by their level (the mean of `values`): highest first, a run without values last."""
    mean = mean_sd(values)[0]
    return -mean if math.isfinite(mean) else math.inf


def number(value, digits=2):
    """'0.13', '−0.05' (a minus sign), and '0.00' for what rounds to zero (no '−0.00')."""
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text.replace("-", MINUS)


def rate(lr):
    """A learning rate as the text writes it: '1e-3', '5e-4'; '0.00015' where one digit would round it."""
    text = f"{lr:.0e}".replace("e-0", "e-")
    return text if float(text) == lr else f"{lr:g}"


def signed(value, digits=2):
    """'+0.13', '−0.05', and '0.00' for what rounds to zero."""
    text = number(value, digits)
    return text if text.startswith(MINUS) or not text.strip("0.") else f"+{text}"


def uncertainty(value, digits=2):
    """An sd or standard error: `digits` decimals, or its first significant digit where those would print 0 ('0.004')."""
    return f"{value:.{digits}f}" if round(value, digits) or not value else f"{value:.{-math.floor(math.log10(value))}f}"


def pm(values, digits=2):
    """'mean ± sd' of a list, '—' for none (a run that diverged before its first validation)."""
    mean, sd = mean_sd(values)
    return "—" if not values else f"{number(mean, digits)}{PM}{uncertainty(sd, digits)}"


def signed_pm(value, error):
    return f"{signed(value)}{PM}{uncertainty(error)}"


def spread(values, digits=2):
    """'a–b' of a few numbers ('−a to b' with a negative one), or the one number when they agree to `digits`."""
    low, high = (number(f(values), digits) for f in (min, max)) if values else ("—", "—")
    return low if low == high else f"{low} to {high}" if MINUS in low + high else f"{low}–{high}"


def trend(steps, values, fraction=TREND_FRACTION, tolerance=TREND_DB):
    """(gain, se, verdict): the mean validation PSNR of the last `fraction` of the steps minus that of the `fraction`
    before, its standard error, and "rising" (gain above `tolerance` and 2 se), "flat" (gain and 2 se within
    `tolerance`: a test that can tell) or "noisy" (no detectable trend). Under a learning rate annealed to ~0 the end
    of a run is flat by construction: flat says the run has settled, not that longer training cannot help."""
    last = steps[-1]
    recent = [v for s, v in zip(steps, values) if s > last * (1 - fraction)]
    before = [v for s, v in zip(steps, values) if last * (1 - 2 * fraction) < s <= last * (1 - fraction)]
    if len(recent) < 2 or len(before) < 2:
        return math.nan, math.nan, "—"
    gain = statistics.fmean(recent) - statistics.fmean(before)
    se = math.sqrt(statistics.variance(recent) / len(recent) + statistics.variance(before) / len(before))
    if gain > tolerance and gain > 2 * se:
        return gain, se, "rising"
    return gain, se, "flat" if abs(gain) < tolerance and 2 * se < tolerance else "noisy"


def trend_text(steps, values):
    gain, se, verdict = trend(steps, values)
    wording = {"noisy": "no detectable trend (noisy)"}.get(verdict, verdict)
    return "—" if math.isnan(gain) else f"{signed_pm(gain, se)} dB, {wording}"


def ends(steps, values, window=500):
    """(mean over the first `window` steps, mean over the last `window`): where a logged loss started and ended,
    its step-to-step noise averaged out; NaN for nothing logged."""
    if not steps:
        return math.nan, math.nan
    first = [v for s, v in zip(steps, values) if s < steps[0] + window]
    return statistics.fmean(first), statistics.fmean(v for s, v in zip(steps, values) if s > steps[-1] - window)


def paired(after, before):
    """Mean ± standard error over the images of per-image PSNR differences (one training run each: the ± covers the
    images, not the training noise)."""
    mean, sd = mean_sd([a["psnr"] - b["psnr"] for a, b in zip(after, before)])
    return signed_pm(mean, sd / math.sqrt(len(after)))
