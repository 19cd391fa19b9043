"""Set contents as values: counted and changed like the sets of numbers they stand for,
without enumerating them (issue 8, item 7)."""
from __future__ import annotations

import ipaddress
import time

from hypothesis import given
from hypothesis import strategies as st

from bpfwall.lang.setcontents import Contents, contains, count, elements_intervals, merge, subtract

SMALL = st.integers(0, 40)
ELEMENT = st.one_of(SMALL, st.tuples(SMALL, SMALL).map(lambda t: (min(t), max(t))))
ELEMENTS = st.lists(ELEMENT, max_size=8)


def numbers(elements) -> set[int]:
    out = set()
    for e in elements:
        out |= {e} if isinstance(e, int) else set(range(e[0], e[1] + 1))
    return out


@given(ELEMENTS)
def test_merge_and_count_agree_with_the_numbers(elements):
    intervals = elements_intervals(elements)
    assert numbers(intervals) == numbers(elements)
    assert all(a[1] + 1 < b[0] for a, b in zip(intervals, intervals[1:], strict=False))  # disjoint, not adjacent
    assert count("number", elements) == len(numbers(elements))
    assert all(contains(intervals, v) == (v in numbers(elements)) for v in range(-1, 43))


@given(ELEMENTS, ELEMENTS)
def test_subtract_agrees_with_the_numbers(have, cut):
    out = subtract(elements_intervals(have), elements_intervals(cut))
    assert numbers(out) == numbers(have) - numbers(cut)
    assert out == merge(out)


@given(ELEMENTS, st.lists(st.tuples(st.sampled_from("+-="), ELEMENTS), max_size=5))
def test_contents_follow_a_sequence_of_changes(start, changes):
    contents, model = Contents("number", start), numbers(start)
    for op, elements in changes:
        if op == "+":
            contents.add(elements)
            model |= numbers(elements)
        elif op == "-":
            gone = contents.remove(elements)
            assert gone == len(model & numbers(elements))
            model -= numbers(elements)
        else:
            contents, model = Contents("number", elements), numbers(elements)
        assert len(contents) == len(model)
        assert set(contents.values()) == model


def test_addresses_are_distinct_networks():
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.0.0.0/8", "10.0.0.1/32", "::1/128")]
    contents = Contents("address", nets)
    assert len(contents) == 3 == count("address", nets)
    copy = contents.copy()
    assert contents.remove([ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.9.0.0/16")]) == 1
    assert list(contents.values()) == [nets[0], nets[3]] and len(copy) == 3


def test_the_whole_number_space_costs_nothing():
    start = time.monotonic()
    everything = Contents("number", [(0, 2**32 - 1)])
    everything.add([(0, 2**32 - 1), 7])
    assert len(everything) == 2**32
    assert everything.remove([(1, 2**32 - 2)]) == 2**32 - 2
    assert list(everything.values()) == [0, 2**32 - 1]
    assert time.monotonic() - start < 0.1
