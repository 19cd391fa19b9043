"""build_many: many units' objects at once (the watcher at boot), clang processes side by side.

The compiler is clang behind the `clang_runs` wrapper (conftest.py), so the tests see how many
compiles ran and whether they overlapped without measuring any time.
"""
from __future__ import annotations

import pytest

from bpfwall.build import BuildError, UnitProgram, build, build_many
from bpfwall.lang.checker import analyze

pytestmark = pytest.mark.kernel


def program(expr: str) -> UnitProgram:
    return UnitProgram(analyze(expr), None)


def test_misses_compile_side_by_side(clang_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("BPFWALL_TEST_TOGETHER", "2")
    objects = build_many([program("udp && dst_port == 1"), program("tcp && dst_port == 2")], tmp_path / "cache", jobs=2)
    assert (clang_runs.count(), clang_runs.count("alone")) == (2, 0)
    assert [o.programs.keys() for o in objects] == [{"cgroup_skb/ingress", "cgroup_skb/egress"}] * 2


def test_objects_come_in_order_and_identical_programs_compile_once(clang_runs, tmp_path):
    cache = tmp_path / "cache"
    texts = ["udp && dst_port == 1", "tcp", "udp && dst_port == 1", "icmp"]
    objects = build_many([program(t) for t in texts], cache, jobs=1)
    assert clang_runs.count() == 1 and objects[0] is objects[2]  # three units, one batch
    cached = [build(program(t), cache) for t in texts]  # from the cache now: no further run
    assert clang_runs.count() == 1
    assert [o.programs["cgroup_skb/ingress"].insns for o in objects] == \
        [o.programs["cgroup_skb/ingress"].insns for o in cached]


def test_a_failed_compile_raises_its_error(clang_runs, tmp_path):
    with pytest.raises(BuildError, match="clang failed to compile the filter: error: planted failure"):
        build_many([program("tcp"), program("udp && dst_port == 666"), program("icmp")], tmp_path / "cache")
