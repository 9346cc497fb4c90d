"""Pareto fronts (maximisation) and exact hypervolumes against hand-computed 2-D and 3-D examples, and
against inclusion-exclusion over the boxes on random small sets (3-D and 4-D)."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from rlgen.evaluation.pareto import dominates, hypervolume, pareto_front

POINTS_2D = [(1, 5), (2, 4), (3, 1), (2, 2), (2, 4), (0, 5)]


def test_dominates():
    assert dominates((2, 4), (2, 2))
    assert dominates((1, 5), (0, 5))
    assert not dominates((2, 4), (2, 4))  # equal points do not dominate each other
    assert not dominates((3, 1), (1, 5))


def test_front_2d_by_hand():
    # (2, 2) is dominated by (2, 4), (0, 5) by (1, 5); the two copies of (2, 4) are both on the front
    assert pareto_front(POINTS_2D) == [0, 1, 2, 4]
    assert pareto_front(POINTS_2D, keep_duplicates=False) == [0, 1, 2]
    assert pareto_front([(1, 1)] * 3) == [0, 1, 2]
    assert pareto_front([(1, 1)] * 3, keep_duplicates=False) == [0]
    assert pareto_front([]) == []


def test_front_3d_by_hand():
    points = [(1, 2, 3), (3, 2, 1), (1, 1, 1), (2, 2, 2), (1, 2, 2), (0, 0, 4)]
    # (1,1,1) and (1,2,2) are dominated (by (2,2,2), and (1,2,2) also by (1,2,3)); the rest are incomparable
    assert pareto_front(points) == [0, 1, 3, 5]


def test_hypervolume_2d_by_hand():
    # union of [0,1]x[0,5], [0,2]x[0,4], [0,3]x[0,1]: y in [0,1] -> 3, [1,4] -> 2 * 3, [4,5] -> 1
    assert hypervolume(POINTS_2D, (0, 0)) == pytest.approx(10.0)
    # only the parts above the reference count: (3, 1) and (1, 5) add nothing above (1, 1)
    assert hypervolume(POINTS_2D, (1, 1)) == pytest.approx(3.0)
    assert hypervolume([(0.5, 0.5)], (0, 0)) == pytest.approx(0.25)
    assert hypervolume([(-1, 3)], (0, 0)) == 0.0
    assert hypervolume([], (0, 0)) == 0.0


def test_hypervolume_ignores_dominated_points_and_duplicates():
    front = [POINTS_2D[i] for i in pareto_front(POINTS_2D, keep_duplicates=False)]
    assert hypervolume(front, (0, 0)) == hypervolume(POINTS_2D, (0, 0)) == hypervolume(POINTS_2D * 3, (0, 0))


def test_hypervolume_3d_by_hand():
    assert hypervolume([(1, 1, 1)], (0, 0, 0)) == pytest.approx(1.0)
    # two 2x1x1 boxes overlapping in a unit cube: 2 + 2 - 1
    assert hypervolume([(2, 1, 1), (1, 2, 1)], (0, 0, 0)) == pytest.approx(3.0)
    # three: 2 + 2 + 2 - 3 * 1 + 1
    assert hypervolume([(2, 1, 1), (1, 2, 1), (1, 1, 2)], (0, 0, 0)) == pytest.approx(4.0)
    # 3x1x2 (6) and 1x3x1 (3) sharing a unit cube: 8
    assert hypervolume([(3, 1, 2), (1, 3, 1)], (0, 0, 0)) == pytest.approx(8.0)
    # shifted reference: (3,1,2) - (1,0,0) = 2x1x2 = 4; (1,3,1) is not above it in x
    assert hypervolume([(3, 1, 2), (1, 3, 1)], (1, 0, 0)) == pytest.approx(4.0)
    assert hypervolume([(2,), (3,), (1,)], (0.5,)) == pytest.approx(2.5)


def inclusion_exclusion(points, ref):
    total = 0.0
    for size in range(1, len(points) + 1):
        for subset in itertools.combinations(points, size):
            corner = [min(p[k] for p in subset) for k in range(len(ref))]
            volume = math.prod(max(0.0, c - r) for c, r in zip(corner, ref))
            total += (-1) ** (size + 1) * volume
    return total


@pytest.mark.parametrize("dim", [2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_hypervolume_matches_inclusion_exclusion(dim, seed):
    rng = random.Random(seed * 10 + dim)
    points = [tuple(rng.choice([0.5, 1.0, 1.5, 2.0, rng.random() * 3]) for _ in range(dim)) for _ in range(7)]
    ref = tuple(rng.random() * 0.5 for _ in range(dim))
    assert hypervolume(points, ref) == pytest.approx(inclusion_exclusion(points, ref), rel=1e-9, abs=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="objectives"):
        pareto_front([(1, 2), (1, 2, 3)])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1, float("nan"))])
    with pytest.raises(ValueError, match="reference"):
        hypervolume([(1, 2)], (0, 0, 0))
    # an infinite (or NaN) reference coordinate would make the volume infinite or NaN: refused
    for bad in ((0, -math.inf), (float("nan"), 0)):
        with pytest.raises(ValueError, match="reference point must be finite"):
            hypervolume([(1, 2)], bad)


def test_registered():
    from rlgen.plugins import registry

    assert registry("metric").get("pareto-front")(POINTS_2D) == [0, 1, 2, 4]
    assert registry("metric").get("hypervolume")(POINTS_2D, (0, 0)) == pytest.approx(10.0)
