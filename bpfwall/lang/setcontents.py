"""A named set's contents as values: counted and changed without expanding ranges.

Number elements are kept as merged inclusive intervals, so `0..4294967295` is
one pair, not four billion numbers: counting costs nothing, and a backend only
enumerates contents already known to fit its capacity (the BPF backend holds one
hash-map key per number). Address elements are distinct networks, one LPM-trie
key each. Elements come as values.parse_set_elements gives them: ints and
(lo, hi) tuples for numbers, ipaddress networks for addresses.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Iterator


# -- sorted disjoint inclusive intervals ------------------------------------------------

def merge(intervals) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent intervals covering the same numbers."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def elements_intervals(elements) -> list[tuple[int, int]]:
    """Number-set elements (ints and (lo, hi)) as merged intervals."""
    return merge((e, e) if isinstance(e, int) else (e[0], e[1]) for e in elements)


def contains(intervals, value: int) -> bool:
    """Whether `value` lies in merged `intervals` (binary search)."""
    i = bisect_right(intervals, (value, float("inf"))) - 1
    return i >= 0 and intervals[i][0] <= value <= intervals[i][1]


def subtract(have, cut) -> list[tuple[int, int]]:
    """Merged `have` without the numbers of merged `cut`."""
    out, j = [], 0
    for lo, hi in have:
        while j < len(cut) and cut[j][1] < lo:
            j += 1
        k = j
        while k < len(cut) and cut[k][0] <= hi:
            if cut[k][0] > lo:
                out.append((lo, cut[k][0] - 1))
            lo = max(lo, cut[k][1] + 1)
            k += 1
        if lo <= hi:
            out.append((lo, hi))
    return out


def span(intervals) -> int:
    """How many numbers the merged intervals hold."""
    return sum(hi - lo + 1 for lo, hi in intervals)


def count(kind: str, elements) -> int:
    """Keys the elements take in a set of `kind`: distinct numbers, or distinct networks."""
    return len(Contents(kind, elements))


# -- a set's contents --------------------------------------------------------------------

class Contents:
    """What one set holds; `len()` is its number of keys, computed, never enumerated."""

    def __init__(self, kind: str, elements: Iterable = ()):
        if kind not in ("number", "address"):
            raise ValueError(f"set kind must be 'number' or 'address', not {kind!r}")
        self.kind = kind
        self.intervals: list[tuple[int, int]] = []
        self.networks: dict = {}  # insertion-ordered, used as an ordered set
        self.add(elements)

    def copy(self) -> "Contents":
        out = Contents(self.kind)
        out.intervals = list(self.intervals)
        out.networks = dict(self.networks)
        return out

    def add(self, elements: Iterable) -> None:
        if self.kind == "number":
            self.intervals = merge([*self.intervals, *elements_intervals(elements)])
        else:
            self.networks.update(dict.fromkeys(elements))

    def remove(self, elements: Iterable) -> int:
        """Take the elements out; how many keys that removed."""
        before = len(self)
        if self.kind == "number":
            self.intervals = subtract(self.intervals, elements_intervals(elements))
        else:
            for net in elements:
                self.networks.pop(net, None)
        return before - len(self)

    def __len__(self) -> int:
        return span(self.intervals) if self.kind == "number" else len(self.networks)

    def __contains__(self, value) -> bool:
        if self.kind == "number":
            return contains(self.intervals, value)
        return value in self.networks

    def values(self) -> Iterator:
        """Every number (one at a time: only call once len() is known to be small) or network."""
        if self.kind == "number":
            for lo, hi in self.intervals:
                yield from range(lo, hi + 1)
        else:
            yield from self.networks
