"""Statistical tests of the cohort report, all from scipy.stats, chosen by one normality rule.

The rule (as in Huang et al. 2020): a sample is taken as normal when the Shapiro-Wilk test does
not reject normality at ``alpha`` (p >= alpha). Normal samples are summarised as mean (SD) and
compared with t-tests / one-way ANOVA; otherwise median (IQR) and rank tests (Wilcoxon
signed-rank, Kruskal-Wallis, Mann-Whitney U). A sample of fewer than :data:`MIN_N` values, or
whose values are all equal, cannot be tested for normality and takes the rank-based branch.

Every function returns a plain dict (JSON-ready: no NaN, numbers as float) with a ``status``:
``"ok"``, ``"not enough data (n=...)"`` when there are too few values for the test, or
``"not computable: ..."`` for a degenerate sample (all differences zero, all values equal).
Numeric warnings from scipy are kept in ``warnings`` rather than printed.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05
MIN_N = 3
"""Fewest values for a normality test and for any group in a test (Shapiro-Wilk needs 3)."""
MIN_FIT_N = 5
MIN_FIT_DISTINCT_X = 4
"""A cubic fit needs more points than its 4 coefficients, at 4 or more distinct days."""
OK = "ok"

SHAPIRO = "Shapiro-Wilk"
PAIRED_T = "paired t-test"
WILCOXON = "Wilcoxon signed-rank"
ANOVA = "one-way ANOVA"
KRUSKAL = "Kruskal-Wallis"
WELCH_T = "Welch t-test"
MANN_WHITNEY = "Mann-Whitney U"
MEAN_SD = "mean (SD)"
MEDIAN_IQR = "median (IQR)"


def not_enough(n: int | str) -> str:
    return f"not enough data (n={n})"


def _num(value: object) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if value is None:
        return None
    v = float(value)  # type: ignore[arg-type]
    return v if math.isfinite(v) else None


def _run(test: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, list[str]]:
    """Call a scipy test; its RuntimeWarnings (precision loss, division) are returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = test(*args, **kwargs)
    return result, list(dict.fromkeys(str(w.message) for w in caught))


def _finish(out: dict, result: object, caught: list[str]) -> dict:
    out["statistic"] = _num(result.statistic)  # type: ignore[attr-defined]
    out["p_value"] = _num(result.pvalue)  # type: ignore[attr-defined]
    if caught:
        out["warnings"] = caught
    if out["p_value"] is None:
        out["status"] = "not computable: the test returned no p-value"
    return out


def normality(values: Sequence[float], alpha: float = ALPHA) -> dict:
    """Shapiro-Wilk; ``normal`` is None when the sample cannot be tested."""
    x = np.asarray(values, dtype=float)
    out: dict = {"test": SHAPIRO, "n": int(x.size), "statistic": None, "p_value": None,
                 "normal": None, "status": OK}
    if x.size < MIN_N:
        out["status"] = not_enough(x.size)
        return out
    if np.ptp(x) == 0:
        out["status"] = "not computable: all values are equal"
        return out
    result, caught = _run(stats.shapiro, x)
    _finish(out, result, caught)
    if out["p_value"] is not None:
        out["normal"] = out["p_value"] >= alpha
    return out


def _is_normal(norm: dict) -> bool:
    return norm["normal"] is True


def describe(values: Sequence[float], alpha: float = ALPHA) -> dict:
    """Mean, SD, median, quartiles (linear interpolation), range, and which summary the
    normality rule reports."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    norm = normality(x, alpha)
    out: dict = {"n": n, "normality": norm, "reported": MEAN_SD if _is_normal(norm) else MEDIAN_IQR,
                 "status": OK if n else not_enough(0)}
    if n == 0:
        out.update(mean=None, sd=None, median=None, q1=None, q3=None, min=None, max=None)
        return out
    q1, median, q3 = np.percentile(x, [25, 50, 75])
    out.update(mean=float(np.mean(x)), sd=float(np.std(x, ddof=1)) if n > 1 else None,
               median=float(median), q1=float(q1), q3=float(q3), min=float(x.min()),
               max=float(x.max()))
    return out


def paired(before: Sequence[float], after: Sequence[float], alpha: float = ALPHA) -> dict:
    """Paired comparison of the same patients at two times: paired t-test when the
    differences (after - before) are normal, else Wilcoxon signed-rank. The statistic is
    positive (t) when PLO went up."""
    a, b = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"`after` must have the length of `before` ({a.size}), got {b.size}")
    d = b - a
    out: dict = {"n": int(d.size), "test": None, "statistic": None, "p_value": None,
                 "mean_difference": _num(np.mean(d)) if d.size else None,
                 "median_difference": _num(np.median(d)) if d.size else None,
                 "normality": normality(d, alpha), "status": OK}
    if d.size < MIN_N:
        out["status"] = not_enough(d.size)
        return out
    if not np.any(d):
        out["status"] = "not computable: every paired difference is zero"
        return out
    if _is_normal(out["normality"]):
        out["test"] = PAIRED_T
        result, caught = _run(stats.ttest_rel, b, a)
    else:
        out["test"] = WILCOXON
        result, caught = _run(stats.wilcoxon, b, a)
    return _finish(out, result, caught)


def _sizes(groups: Mapping[str, Sequence[float]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in groups.items())


def across(groups: Mapping[str, Sequence[float]], alpha: float = ALPHA) -> dict:
    """Independent groups (clinical types): one-way ANOVA when every group is normal, else
    Kruskal-Wallis; then every pair with Welch's t-test or Mann-Whitney U (the same branch),
    p-values Bonferroni-corrected for the number of pairs tested. Groups of fewer than
    :data:`MIN_N` values are left out (listed in ``excluded``)."""
    used = {k: np.asarray(v, dtype=float) for k, v in groups.items() if len(v) >= MIN_N}
    out: dict = {"groups": {k: len(v) for k, v in groups.items()},
                 "excluded": [k for k, v in groups.items() if len(v) < MIN_N],
                 "test": None, "statistic": None, "p_value": None, "normality": {},
                 "pairwise": [], "status": OK}
    if len(used) < 2:
        out["status"] = (f"{not_enough(_sizes(groups))}; needs 2 groups of at least {MIN_N}")
        return out
    out["normality"] = {k: normality(v, alpha) for k, v in used.items()}
    normal = all(_is_normal(n) for n in out["normality"].values())
    if np.ptp(np.concatenate(list(used.values()))) == 0:
        out["status"] = "not computable: all values are equal"
        return out
    out["test"] = ANOVA if normal else KRUSKAL
    result, caught = _run(stats.f_oneway if normal else stats.kruskal, *used.values())
    _finish(out, result, caught)
    pairs = []
    for a, b in itertools.combinations(used, 2):
        pair: dict = {"a": a, "b": b, "n_a": int(used[a].size), "n_b": int(used[b].size),
                      "test": WELCH_T if normal else MANN_WHITNEY, "statistic": None,
                      "p_value": None, "p_bonferroni": None, "status": OK}
        if normal:
            result, caught = _run(stats.ttest_ind, used[a], used[b], equal_var=False)
        else:
            result, caught = _run(stats.mannwhitneyu, used[a], used[b], alternative="two-sided")
        pairs.append(_finish(pair, result, caught))
    tested = [p for p in pairs if p["p_value"] is not None]
    for p in tested:
        p["p_bonferroni"] = min(1.0, p["p_value"] * len(tested))
    out["pairwise"] = pairs
    out["bonferroni_m"] = len(tested)
    return out


def cubic_fit(x: Sequence[float], y: Sequence[float]) -> dict:
    """numpy.polyfit of degree 3 (coefficients highest power first) and its R²
    (1 - residual / total sum of squares)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out: dict = {"degree": 3, "n": int(xs.size), "coefficients": None, "r_squared": None,
                 "status": OK}
    distinct = int(np.unique(xs).size)
    if xs.size < MIN_FIT_N or distinct < MIN_FIT_DISTINCT_X:
        out["status"] = (f"{not_enough(int(xs.size))}; a cubic fit needs {MIN_FIT_N} points at "
                         f"{MIN_FIT_DISTINCT_X} distinct days, got {distinct} days")
        return out
    coef, caught = _run(np.polyfit, xs, ys, 3)
    residual = float(np.sum((ys - np.polyval(coef, xs)) ** 2))
    total = float(np.sum((ys - ys.mean()) ** 2))
    out["coefficients"] = [float(c) for c in coef]  # type: ignore[union-attr]
    out["r_squared"] = 1.0 - residual / total if total > 0 else None
    if total == 0:
        out["status"] = "not computable: every PLO is the same, R² is undefined"
    if caught:
        out["warnings"] = caught
    return out
