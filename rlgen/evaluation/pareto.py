"""Pareto fronts and hypervolumes of points whose every objective is maximised (mean rewards of the models
of a merge sweep, runs compared on several metrics).

A point a dominates b when a >= b in every objective and a > b in at least one. The hypervolume of a set
of points with respect to a reference point r is the volume (area in 2-D) of the union of the boxes
[r, p] over the points p; only the parts above r count (a point not above r in every objective adds
nothing). It is computed exactly: a sweep in 2-D, and in more dimensions by slicing along the last
objective (each slab between consecutive distinct values is the (d-1)-dimensional hypervolume of the
points reaching it, times its thickness), which costs O(n^(d-1) log n): meant for tens of points.
"""
from __future__ import annotations

import math
from typing import Sequence


def _as_points(points: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    rows = [tuple(float(v) for v in p) for p in points]
    if rows:
        width = len(rows[0])
        if width == 0:
            raise ValueError("points need at least one objective")
        for i, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"point {i} has {len(row)} objectives, point 0 has {width}")
            if any(math.isnan(v) for v in row):
                raise ValueError(f"point {i} has a NaN objective")
    return rows


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a >= b everywhere and a > b somewhere (maximisation)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]], keep_duplicates: bool = True) -> list[int]:
    """Indices (ascending) of the non-dominated points, every objective maximised. Equal points do not
    dominate each other: all copies of a non-dominated point are on the front, or only the first one
    with `keep_duplicates=False`."""
    rows = _as_points(points)
    front = []
    seen: set = set()
    for i, p in enumerate(rows):
        if any(dominates(q, p) for j, q in enumerate(rows) if j != i):
            continue
        if not keep_duplicates:
            if p in seen:
                continue
            seen.add(p)
        front.append(i)
    return front


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by `points` (maximisation) above the `reference` point (finite). The
    value depends on the reference: compare hypervolumes only when they share one (a fixed point, not
    each set's own worst values)."""
    ref = tuple(float(v) for v in reference)
    rows = _as_points(points)
    if rows and len(rows[0]) != len(ref):
        raise ValueError(f"the reference point has {len(ref)} objectives, the points have {len(rows[0])}")
    if not all(math.isfinite(v) for v in ref):  # an infinite coordinate makes every volume infinite (or NaN)
        raise ValueError(f"the reference point must be finite, got {ref}")
    # Only the parts above the reference count; a point not strictly above it in every objective adds nothing.
    kept = sorted({p for p in rows if all(x > r for x, r in zip(p, ref))})
    if not kept:
        return 0.0
    return _hv(kept, ref)


def _hv(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    d = len(ref)
    if d == 1:
        return max(p[0] for p in points) - ref[0]
    if d == 2:
        return _hv2(points, ref)
    # Slice along the last objective: between consecutive distinct values z_k > z_{k+1} (the last one being
    # the reference) the cross-section is the (d-1)-D hypervolume of the points with z >= z_k.
    levels = sorted({p[-1] for p in points}, reverse=True)
    total = 0.0
    for k, z in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else ref[-1]
        section = [p[:-1] for p in points if p[-1] >= z]
        total += _hv(section, ref[:-1]) * (z - below)
    return total


def _hv2(points, ref) -> float:
    """2-D sweep: by decreasing x, each point higher than all before adds (x - r_x) * (y - best y so far)."""
    area = 0.0
    top = ref[1]
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > top:
            area += (x - ref[0]) * (y - top)
            top = y
    return area
