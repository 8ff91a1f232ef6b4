"""Agreement between scores: errors, correlation, ICC, Fleiss' kappa, Bland-Altman.

Paired functions take two equal-length 1-D sequences ``a`` (e.g. the method)
and ``b`` (e.g. the reference); differences are ``a - b``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

ICC_FORMS = ("ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(1,k)", "ICC(2,k)", "ICC(3,k)")


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"a and b differ in length: {x.size} vs {y.size}")
    if x.size == 0:
        raise ValueError("a and b are empty")
    return x, y


def mae(a: ArrayLike, b: ArrayLike) -> float:
    """Mean absolute error ``mean(|a - b|)``."""
    x, y = _pair(a, b)
    return float(np.mean(np.abs(x - y)))


def mse(a: ArrayLike, b: ArrayLike) -> float:
    """Mean squared error ``mean((a - b)**2)``."""
    x, y = _pair(a, b)
    return float(np.mean((x - y) ** 2))


def sd_of_differences(a: ArrayLike, b: ArrayLike) -> float:
    """Sample standard deviation (``ddof=1``) of ``a - b``; ``nan`` for n < 2."""
    x, y = _pair(a, b)
    return float(np.std(x - y, ddof=1)) if x.size > 1 else float("nan")


def pearson_r(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Pearson correlation and its two-sided p-value (``scipy.stats.pearsonr``).

    Returns ``(nan, nan)`` when n < 3 or either input is constant.
    """
    x, y = _pair(a, b)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def _icc_mean_squares(ratings: NDArray[np.float64]) -> dict[str, float]:
    n, k = ratings.shape
    grand = ratings.mean()
    ss_total = float(((ratings - grand) ** 2).sum())
    ss_rows = float(k * ((ratings.mean(axis=1) - grand) ** 2).sum())
    ss_cols = float(n * ((ratings.mean(axis=0) - grand) ** 2).sum())
    ss_err = ss_total - ss_rows - ss_cols
    return {
        "BMS": ss_rows / (n - 1),
        "WMS": (ss_total - ss_rows) / (n * (k - 1)),
        "JMS": ss_cols / (k - 1),
        "EMS": ss_err / ((n - 1) * (k - 1)),
    }


def icc(ratings: ArrayLike, *, form: str = "ICC(2,1)") -> float:
    """Intraclass correlation after Shrout & Fleiss (1979).

    Parameters
    ----------
    ratings : array_like, shape (n_subjects, n_raters)
        Complete table, no missing values; needs n >= 2 and k >= 2.
    form : str
        ``"ICC(1,1)"`` one-way random, single rater; ``"ICC(2,1)"`` two-way
        random, absolute agreement, single rater; ``"ICC(3,1)"`` two-way mixed,
        consistency, single rater; ``"ICC(1,k)"``, ``"ICC(2,k)"``,
        ``"ICC(3,k)"`` the same for the mean of the k raters.

    Notes
    -----
    With BMS, WMS, JMS, EMS the between-subjects, within-subjects,
    between-raters and residual mean squares:

    * ICC(1,1) = (BMS - WMS) / (BMS + (k-1) WMS)
    * ICC(2,1) = (BMS - EMS) / (BMS + (k-1) EMS + k (JMS - EMS) / n)
    * ICC(3,1) = (BMS - EMS) / (BMS + (k-1) EMS)
    * ICC(1,k) = (BMS - WMS) / BMS
    * ICC(2,k) = (BMS - EMS) / (BMS + (JMS - EMS) / n)
    * ICC(3,k) = (BMS - EMS) / BMS
    """
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(f"ratings must be (n_subjects >= 2, n_raters >= 2), got {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("ratings contain missing or non-finite values")
    n, k = r.shape
    ms = _icc_mean_squares(r)
    bms, wms, jms, ems = ms["BMS"], ms["WMS"], ms["JMS"], ms["EMS"]
    formulas = {
        "ICC(1,1)": lambda: (bms - wms) / (bms + (k - 1) * wms),
        "ICC(2,1)": lambda: (bms - ems) / (bms + (k - 1) * ems + k * (jms - ems) / n),
        "ICC(3,1)": lambda: (bms - ems) / (bms + (k - 1) * ems),
        "ICC(1,k)": lambda: (bms - wms) / bms,
        "ICC(2,k)": lambda: (bms - ems) / (bms + (jms - ems) / n),
        "ICC(3,k)": lambda: (bms - ems) / bms,
    }
    if form not in formulas:
        raise ValueError(f"form must be one of {ICC_FORMS}, got {form!r}")
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(formulas[form]()))


def fleiss_kappa(counts: ArrayLike) -> float:
    """Fleiss' kappa from a subjects-by-categories count table.

    Parameters
    ----------
    counts : array_like of int, shape (n_subjects, n_categories)
        ``counts[i, j]`` raters who put subject ``i`` in category ``j``; every
        row must sum to the same number of raters ``m >= 2``.

    Notes
    -----
    ``P_i = (sum_j n_ij^2 - m) / (m (m - 1))``, ``p_j = sum_i n_ij / (N m)``,
    ``kappa = (mean(P_i) - sum_j p_j^2) / (1 - sum_j p_j^2)``. ``nan`` when all
    ratings fall in one category (chance agreement is 1).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0:
        raise ValueError(f"counts must be a non-empty 2-D table, got shape {c.shape}")
    m = c.sum(axis=1)
    if not np.all(m == m[0]) or m[0] < 2:
        raise ValueError("every subject must be rated by the same number (>= 2) of raters")
    n_sub, m0 = c.shape[0], m[0]
    p_i = ((c**2).sum(axis=1) - m0) / (m0 * (m0 - 1))
    p_j = c.sum(axis=0) / (n_sub * m0)
    p_e = float((p_j**2).sum())
    if np.isclose(p_e, 1.0):
        return float("nan")
    return float((p_i.mean() - p_e) / (1.0 - p_e))


def bland_altman(a: ArrayLike, b: ArrayLike, *, z: float = 1.96) -> dict[str, float]:
    """Bland-Altman bias and limits of agreement of ``a - b``.

    Returns
    -------
    dict
        ``n``, ``mean_diff`` (bias), ``sd_diff`` (``ddof=1``), ``loa_lower`` and
        ``loa_upper`` (``mean_diff -/+ z * sd_diff``), and ``mean_of_means``.
    """
    x, y = _pair(a, b)
    d = x - y
    sd = float(np.std(d, ddof=1)) if d.size > 1 else float("nan")
    bias = float(d.mean())
    return {
        "n": int(d.size),
        "mean_diff": bias,
        "sd_diff": sd,
        "loa_lower": bias - z * sd,
        "loa_upper": bias + z * sd,
        "mean_of_means": float(((x + y) / 2).mean()),
    }
