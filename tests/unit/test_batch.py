"""batch.py's pure parts: how misses are grouped into clang runs, which units may share one,
and the translation unit it writes (compiled in tests/kernel/test_build_batch.py)."""
from __future__ import annotations

from bpfwall import batch


def test_groups_keep_kinds_apart_fill_the_workers_and_stay_small():
    items = [("a", i) for i in range(30)] + [("b", 0), ("c", 0), ("c", 1)]
    out = batch.groups(items, 2, lambda item: (item[0], item[0] != "c"))
    assert [i for g in out for i in g] == items  # contiguous, in order
    assert all(len({i[0] for i in g}) == 1 for g in out)  # one kind per group
    a = [len(g) for g in out if g[0][0] == "a"]
    assert max(a) <= batch.MAX_UNITS and max(a) - min(a) <= 1 and len(a) == -(-30 // batch.MAX_UNITS)
    assert [len(g) for g in out if g[0][0] != "a"] == [1, 1, 1]  # b: one item; c: not batchable
    assert [len(g) for g in batch.groups(list(range(6)), 2, lambda _: (0, True))] == [3, 3]  # both CPUs
    hundred = [len(g) for g in batch.groups(list(range(100)), 2, lambda _: (0, True))]
    assert len(hundred) % 2 == 0 and max(hundred) <= batch.MAX_UNITS and max(hundred) - min(hundred) <= 1


def test_a_param_named_like_a_renamed_name_keeps_its_unit_out_of_batches():
    assert batch.batchable(["a", "limit", "port"], {"ports": "number", "nets": "address"})
    for params, sets in ((["mode"], {}), (["events"], {}), (["set_x"], {"x": "number"}), (["bpfwall_u1_a"], {})):
        assert not batch.batchable(params, sets), params
    assert batch.batchable(["set_x"], {})  # no @x: nothing renamed to clash with


def test_source_includes_the_shared_part_once_then_each_unit_with_its_names_prefixed():
    text = batch.source([("unit0.h", batch.renamed({})), ("unit1.h", batch.renamed({"ports": "number"}))])
    lines = text.splitlines()
    assert lines[1:4] == ["#define BPFWALL_SHARED_ONLY", '#include "port_filter.c"', "#undef BPFWALL_SHARED_ONLY"]
    assert lines.count('#include "port_filter.c"') == 3
    assert "#define counters bpfwall_u0_counters" in lines and "#define set_ports bpfwall_u1_set_ports" in lines
    assert "#define set_ports bpfwall_u0_set_ports" not in lines
    second = lines.index('#define BPFWALL_FILTER_H "unit1.h"')
    assert {"#undef counters", "#undef BPFWALL_META_SIZE", "#undef BPFWALL_HAS_PARAMS"} <= set(lines[:second])
