"""helpers.holm: Holm's step-down adjusted p-values, against values worked out by hand.

For m p-values sorted p_(1) <= ... <= p_(m), Holm's adjusted value of the i-th smallest is

    max over j <= i of min(1, (m - j + 1) p_(j))

(the running maximum keeps the adjusted values in the order of the raw ones). Bonferroni's is
min(1, m p), larger for all but the smallest; a step-down without the running maximum can
declare a comparison different after a smaller p-value was not. statsmodels is not a
dependency, so the expected values are written out below.
"""

import numpy as np
import pytest

import helpers


def family(ps, diff=1.0):
    return [helpers.Comparison("A", "B", diff, 0.1, 2.0, p, 10, "paired t-test", 0.5) for p in ps]


def adjusted(ps):
    out = helpers.holm(family(ps))
    assert [c.p for c in out] == list(ps) and {c.family for c in out} == {len(ps)}
    return [c.p_holm for c in out]


def test_running_maximum_matters():
    # sorted: 0.001 * 5 = 0.005, 0.0125 * 4 = 0.05, 0.02 * 3 = 0.06, 0.025 * 2 = 0.05 -> 0.06
    # (the running maximum), 0.3 * 1 = 0.3; given back in the input's order
    ps = [0.02, 0.001, 0.025, 0.3, 0.0125]
    assert adjusted(ps) == pytest.approx([0.06, 0.005, 0.06, 0.3, 0.05], abs=1e-15)
    # Bonferroni would give [0.1, 0.005, 0.125, 1.0, 0.0625]; no running maximum, 0.05 for 0.025


def test_holm_is_less_strict_than_bonferroni():
    # sorted: 0.004 * 3 = 0.012, 0.012 * 2 = 0.024, 0.03 * 1 = 0.03 (already increasing)
    ps = [0.004, 0.03, 0.012]
    assert adjusted(ps) == pytest.approx([0.012, 0.03, 0.024], abs=1e-15)
    # Bonferroni: [0.012, 0.09, 0.036]: the second would not be a detected difference
    assert [c.verdict for c in helpers.holm(family(ps))] == ["ahead"] * 3


def test_step_down_stops_at_the_first_comparison_it_keeps():
    """0.01 * 3 = 0.03 < 0.05: different; 0.03 * 2 = 0.06: not, so Holm stops there, and
    0.031 (0.031 * 1 < 0.05 on its own) is not declared different either."""
    ps = [0.031, 0.01, 0.03]
    out = helpers.holm(family(ps, diff=-1.0))
    assert [c.p_holm for c in out] == pytest.approx([0.06, 0.03, 0.06], abs=1e-15)
    assert [c.verdict for c in out] == [
        "no difference detected",
        "behind",
        "no difference detected",
    ]


def test_capped_at_one_and_a_family_of_one_unchanged():
    assert adjusted([0.4, 0.6, 0.9]) == pytest.approx([1.0, 1.0, 1.0])
    assert adjusted([0.0123]) == [0.0123]


def rejected_step_down(ps, alpha):
    """Holm's procedure as he stated it: walk up the sorted p-values, declare p_(i) different
    while p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    m, out = len(ps), set()
    for i, k in enumerate(np.argsort(ps, kind="stable")):
        if ps[k] > alpha / (m - i):
            break
        out.add(int(k))
    return out


def test_adjusted_values_reproduce_the_step_down_procedure():
    """Random families: {p_holm <= alpha} is exactly the set the sequential procedure declares,
    at every alpha; each adjusted value lies between p and min(1, m p)."""
    rng = np.random.default_rng(0)
    checked_differs_from_bonferroni = 0
    for _ in range(300):
        m = int(rng.integers(2, 9))
        ps = list(rng.uniform(0, 0.08, m) ** rng.uniform(1, 2))
        adj = np.array(adjusted(ps))
        p = np.array(ps)
        assert np.all(adj >= p - 1e-15) and np.all(adj <= np.minimum(1, m * p) + 1e-15)
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= 0)  # same order as the raw p-values
        for alpha in (0.01, 0.05, 0.1):
            assert set(np.flatnonzero(adj <= alpha)) == rejected_step_down(ps, alpha)
            bonferroni = set(np.flatnonzero(np.minimum(1, m * p) <= alpha))
            checked_differs_from_bonferroni += bonferroni != rejected_step_down(ps, alpha)
    assert checked_differs_from_bonferroni > 50  # the cases that tell Holm from Bonferroni
