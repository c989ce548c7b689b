"""helpers.holm against values worked out by hand and against Holm's procedure as he stated it.

For m p-values sorted p_(1) <= ... <= p_(m), the adjusted value of the i-th smallest is
max over j <= i of min(1, (m - j + 1) p_(j)): the running maximum keeps the raw order.
"""

import numpy as np
import pytest

import helpers


def family(ps, diff=1.0):
    return [helpers.Comparison("A", "B", diff, 0.1, 2.0, p, 10, "paired t-test", 0.5) for p in ps]


@pytest.mark.parametrize(
    ("ps", "adjusted"),
    [
        # sorted: 0.001 * 5, 0.013 * 4 = 0.052, 0.02 * 3 = 0.06, 0.025 * 2 = 0.05 -> 0.06 (the
        # running maximum), 0.3; Bonferroni would give 0.1, 0.005, 0.125, 1, 0.065
        ([0.02, 0.001, 0.025, 0.3, 0.013], [0.06, 0.005, 0.06, 0.3, 0.052]),
        # 0.004 * 3, 0.012 * 2, 0.03: all below 5 %, where Bonferroni's 0.09 for 0.03 is not
        ([0.004, 0.03, 0.012], [0.012, 0.03, 0.024]),
        # 0.01 * 3 = 0.03 different; 0.03 * 2 = 0.06 not, and Holm stops: 0.031 is not either
        ([0.031, 0.01, 0.03], [0.06, 0.03, 0.06]),
        ([0.4, 0.6, 0.9], [1.0, 1.0, 1.0]),  # capped at 1
        ([0.0123], [0.0123]),  # a family of one is unchanged
    ],
)
def test_adjusted_values_worked_out_by_hand(ps, adjusted):
    out = helpers.holm(family(ps, diff=-1.0))
    assert [c.p for c in out] == ps and {c.family for c in out} == {len(ps)}
    assert [c.p_holm for c in out] == pytest.approx(adjusted, abs=1e-15)
    verdicts = ["behind" if p < 0.05 else "no difference detected" for p in adjusted]
    assert [c.verdict for c in out] == verdicts


def rejected_step_down(ps, alpha):
    """Holm's procedure: walk up the sorted p-values, declare p_(i) different while
    p_(i) <= alpha / (m - i + 1), stop at the first that is not."""
    m, out = len(ps), set()
    for i, k in enumerate(np.argsort(ps, kind="stable")):
        if ps[k] > alpha / (m - i):
            break
        out.add(int(k))
    return out


def test_adjusted_values_reproduce_the_step_down_procedure():
    """Random families: {p_holm <= alpha} is exactly the set the procedure declares, at every
    alpha, and in many of them that set is not Bonferroni's."""
    rng = np.random.default_rng(0)
    differs_from_bonferroni = 0
    for _ in range(300):
        m = int(rng.integers(2, 9))
        p = rng.uniform(0, 0.08, m) ** rng.uniform(1, 2)
        adj = np.array([c.p_holm for c in helpers.holm(family(list(p)))])
        for alpha in (0.01, 0.05, 0.1):
            assert set(np.flatnonzero(adj <= alpha)) == rejected_step_down(p, alpha)
            bonferroni = set(np.flatnonzero(np.minimum(1, m * p) <= alpha))
            differs_from_bonferroni += bonferroni != rejected_step_down(p, alpha)
    assert differs_from_bonferroni > 50
