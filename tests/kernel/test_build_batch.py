"""Batches (bpfwall/batch.py): many units from one clang run, each unit's object the one clang
makes for it alone, and verdicts that agree with the reference evaluator.

The compiler is clang behind the `clang_runs` wrapper (conftest.py): the tests count its runs.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall import batch
from bpfwall.build import UnitProgram, build, build_many
from bpfwall.kernel import btf, loader
from bpfwall.lang.checker import analyze, analyze_pair
from tests.kernel.oracle import agrees, program_of
from tests.strategies import scenarios

pytestmark = pytest.mark.kernel

# Every kind of unit part: number and address sets, params, one direction only, both.
PAIRS = [
    ("tcp && local_port in {1000, 3000} || icmp", "udp && dst_port == 2000 || tcp"),
    ("udp && dst_port in @ports || $x > 3", "saddr in @nets || daddr == 10.0.0.1"),
    (None, "tcp && $y == 7 && len <= $mtu"),
    ("ipv6 && remote_addr in {2001:db8::/32, fe80::1}", None),
]


def programs(load_bytes_only: bool = False, **kind) -> list[UnitProgram]:
    return [UnitProgram(*analyze_pair(i, e), load_bytes_only=load_bytes_only, **kind) for i, e in PAIRS]


def shape(obj) -> dict:
    """What decides a unit's behaviour and layout: code, relocations, maps, the BTF's types by
    kind and name, and how many .BTF.ext records each program has (not the type ids and string
    offsets, which depend on what else the object held)."""
    types = btf.parse(obj.btf).types
    return {
        "license": obj.license,
        "maps": {n: (m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                     types[m.btf_key_type_id].name, types[m.btf_value_type_id].name) for n, m in obj.maps.items()},
        "programs": {s: (p.name, p.insns, sorted(p.map_relocs), len(p.func_info), len(p.line_info))
                     for s, p in obj.programs.items()},
        "types": sorted((t.kind, t.name, t.vlen) for t in types),
    }


@pytest.mark.parametrize("load_bytes_only, kind", [
    (False, {}), (True, {}), (False, {"slice_default": True}), (False, {"slice_default": True, "strict": True})])
def test_a_batch_unit_is_the_unit_compiled_alone(clang_runs, tmp_path, load_bytes_only, kind):
    """Every kind of program port_filter.c makes: one clang run for the batch (a name of the
    unit's part missing from batch.UNIT_NAMES would make it fail and compile each alone)."""
    units = programs(load_bytes_only, **kind)
    together = build_many(units, tmp_path / "batch", jobs=1)
    assert clang_runs.count() == 1
    alone = [build(u, tmp_path / "alone") for u in units]
    assert clang_runs.count() == 1 + len(units)
    for a, b in zip(together, alone, strict=True):
        assert shape(a) == shape(b)
        loader.load(a).close()  # and the kernel takes it: BTF, func and line info, maps


def test_batch_entries_are_cached_per_unit_and_share_one_elf(clang_runs, tmp_path):
    cache = tmp_path / "cache"
    first = build_many(programs(), cache, jobs=1)
    objects = sorted(n for n in os.listdir(cache) if n.endswith(".o"))
    assert len(objects) == len(PAIRS) and len({os.stat(cache / n).st_ino for n in objects}) == 1
    assert not [n for n in os.listdir(cache) if n.startswith(".")]  # no temporaries left
    again = [build(u, cache) for u in programs()]  # one at a time, from the cache: no clang run
    assert clang_runs.count() == 1 and [shape(o) for o in again] == [shape(o) for o in first]


def test_a_unit_whose_params_are_renamed_names_compiles_alone(clang_runs, tmp_path):
    """A $param becomes a struct member of its name; one named like a batch-renamed name (`mode`)
    would be renamed with it, so that unit is compiled on its own, its BTF member still `mode`."""
    odd = UnitProgram(analyze("tcp && dst_port == $mode"), None)
    assert not batch.batchable(odd.params, odd.sets) and batch.batchable(["a", "limit"], {"ports": "number"})
    objects = build_many([*programs(), odd], tmp_path / "cache", jobs=1)
    assert clang_runs.count() == 2
    types = btf.parse(objects[-1].btf)
    params = types.resolve(objects[-1].maps["params"].btf_value_type_id)
    assert [m[0] for m in params.members] == ["mode"]


def test_a_failing_batch_reports_its_units_own_error(clang_runs, tmp_path):
    """The batch fails (a header holding 666 does not compile), its units are compiled alone,
    and the error is the failing unit's one line."""
    from bpfwall.build import BuildError

    units = [UnitProgram(analyze(t), None) for t in ("tcp", "udp && dst_port == 666", "icmp")]
    with pytest.raises(BuildError, match="^clang failed to compile the filter: error: planted failure$"):
        build_many(units, tmp_path / "cache", jobs=1)


# The oracle over batch-built objects: each example builds its units in batches (two per
# example's kind), then runs every unit's packets through its cached object.
@settings(max_examples=int(os.environ.get("BPFWALL_BATCH_EXAMPLES", "6")), deadline=None,
          suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.lists(scenarios(), min_size=8, max_size=8))
def test_batch_built_programs_agree_with_reference(clang_runs, tmp_path_factory, cases):
    cache = tmp_path_factory.mktemp("batch-cache")
    os.chmod(cache, 0o700)
    build_many([program_of(c) for c in cases], cache, jobs=2)
    runs = clang_runs.count()
    assert sum(agrees(c, cache) for c in cases) == 8 * len(cases[0][4])
    assert clang_runs.count() == runs  # every program ran from its batch's cache entry
