"""Hand-checked examples for benchmark.metrics.agreement."""

import numpy as np
import pytest

from benchmark.metrics import (
    bland_altman,
    fleiss_kappa,
    icc,
    mae,
    mse,
    pearson_r,
    sd_of_differences,
)
from benchmark.metrics.agreement import _icc_mean_squares

A = [1, 2, 3, 4]
B = [2, 2, 1, 4]
# differences A - B = [-1, 0, 2, 0]; mean 0.25; deviations -1.25, -.25, 1.75, -.25;
# squared 1.5625 + .0625 + 3.0625 + .0625 = 4.75; sample variance 4.75/3
SD = (4.75 / 3) ** 0.5


def test_errors():
    assert mae(A, B) == pytest.approx(0.75)  # (1 + 0 + 2 + 0)/4
    assert mse(A, B) == pytest.approx(1.25)  # (1 + 0 + 4 + 0)/4
    assert sd_of_differences(A, B) == pytest.approx(SD)
    assert mae(B, A) == mae(A, B)
    with pytest.raises(ValueError):
        mae([1, 2], [1])


def test_bland_altman():
    r = bland_altman(A, B)
    assert r["n"] == 4
    assert r["mean_diff"] == pytest.approx(0.25)
    assert r["sd_diff"] == pytest.approx(SD)
    assert r["loa_lower"] == pytest.approx(0.25 - 1.96 * SD)  # = -2.2163
    assert r["loa_upper"] == pytest.approx(0.25 + 1.96 * SD)  # = 2.7163
    assert r["mean_of_means"] == pytest.approx(2.375)  # means 1.5, 2, 2, 4
    assert bland_altman(A, B, z=1.0)["loa_upper"] == pytest.approx(0.25 + SD)


def test_pearson():
    # x = 1,2,3; y = 1,3,2: centred products (-1)(-1) + 0*1 + 1*0 = 1; Sxx = Syy = 2 -> r = .5
    # t = r sqrt((n-2)/(1-r^2)) = 1/sqrt(3), df = 1 (Cauchy): p = 1 - (2/pi) atan(1/sqrt 3) = 2/3
    r, p = pearson_r([1, 2, 3], [1, 3, 2])
    assert r == pytest.approx(0.5)
    assert p == pytest.approx(2 / 3)
    assert all(np.isnan(pearson_r([1, 1, 1], [1, 2, 3])))


# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SF = [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]]


def test_icc_shrout_fleiss_table():
    ms = _icc_mean_squares(np.asarray(SF, dtype=float))
    # the paper's ANOVA table: BMS 11.24, WMS 6.26, JMS 32.49, EMS 1.02
    assert ms["BMS"] == pytest.approx(11.24, abs=0.005)
    assert ms["WMS"] == pytest.approx(6.26, abs=0.005)
    assert ms["JMS"] == pytest.approx(32.49, abs=0.005)
    assert ms["EMS"] == pytest.approx(1.02, abs=0.005)
    # the paper's Table 4, to its two decimals
    expected = {
        "ICC(1,1)": 0.17,
        "ICC(2,1)": 0.29,
        "ICC(3,1)": 0.71,
        "ICC(1,k)": 0.44,
        "ICC(2,k)": 0.62,
        "ICC(3,k)": 0.91,
    }
    for form, value in expected.items():
        assert icc(SF, form=form) == pytest.approx(value, abs=0.005), form
    assert icc(SF) == icc(SF, form="ICC(2,1)")


def test_icc_rater_offset():
    # rater 2 = rater 1 + 1. Grand mean 2.5; row means 1.5, 2.5, 3.5 -> SSR = 2*(1+0+1) = 4,
    # BMS = 2; column means 2, 3 -> SSC = 3*(.25+.25) = 1.5, JMS = 1.5; SST = 5.5 -> SSE = 0.
    # ICC(3,1) = (2-0)/(2+0) = 1; ICC(2,1) = 2/(2 + 0 + 2*1.5/3) = 2/3;
    # WMS = (5.5-4)/3 = .5 -> ICC(1,1) = 1.5/2.5 = .6
    r = [[1, 2], [2, 3], [3, 4]]
    assert icc(r, form="ICC(3,1)") == pytest.approx(1.0)
    assert icc(r, form="ICC(2,1)") == pytest.approx(2 / 3)
    assert icc(r, form="ICC(1,1)") == pytest.approx(0.6)
    with pytest.raises(ValueError):
        icc(r, form="ICC(4,1)")
    with pytest.raises(ValueError):
        icc([[1, 2]])


# Wikipedia "Fleiss' kappa" worked example: 10 subjects, 14 raters, 5 categories
WIKI = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_wikipedia():
    # P-bar = 0.378, P-bar_e = 0.213 -> kappa = (0.378 - 0.213)/(1 - 0.213) = 0.210
    assert fleiss_kappa(WIKI) == pytest.approx(0.210, abs=5e-4)


def test_fleiss_kappa_small_cases():
    # two subjects, 2 raters, full agreement on different categories:
    # P_i = (4 - 2)/(2*1) = 1; p_j = .5, .5 -> P_e = .5 -> kappa = (1 - .5)/(1 - .5) = 1
    assert fleiss_kappa([[2, 0], [0, 2]]) == pytest.approx(1.0)
    # full disagreement: P_i = (1 + 1 - 2)/2 = 0; P_e = .5 -> kappa = -1
    assert fleiss_kappa([[1, 1], [1, 1]]) == pytest.approx(-1.0)
    assert np.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category only
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 2]])  # unequal numbers of raters
