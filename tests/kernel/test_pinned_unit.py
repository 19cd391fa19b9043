"""A loaded unit's maps read and written through program_contract and kernel.maps.Map."""
from __future__ import annotations

import os

import pytest

from bpfwall import program_contract as pc
from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.kernel import maps, pins
from bpfwall.lang.checker import analyze
from bpfwall.lang.values import parse_set_elements

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

UNIT = "a.service"


def load(pin_root, ingress: str, sets: dict[str, str] | None = None, **kw) -> None:
    program = UnitProgram(analyze(ingress), None)
    parsed = {n: parse_set_elements(n, program.sets[n], raw) for n, raw in (sets or {}).items()}
    bpf.load(pin_root, UNIT, program, sets=parsed, **kw)


def test_values_written_are_read_back(pin_root):
    load(pin_root, "dst_port in @s || saddr in @a || len > $max || dst_port == $int",
         params={"max": 1400, "int": 7}, sets={"s": "53,80..81", "a": "10.0.0.0/8,2001:db8::/32"},
         mode="audit")
    s = bpf.stats(pin_root, UNIT)
    assert (s["mode"], s["params"]) == ("audit", {"int": 7, "max": 1400})
    assert s["sets"] == {"a": ["10.0.0.0/8", "2001:db8::/32"], "s": ["53", "80", "81"]}
    assert s["counters"] == {d: {v: {"packets": 0, "bytes": 0} for v in ("pass", "drop")} for d in pc.DIRECTIONS}


def test_a_mode_value_other_than_audit_reads_as_enforce(pin_root):
    """The program lets drops through only for MODE_AUDIT; `stats` says what it does (it used to
    fail with an IndexError on a value written by other tools, e.g. bpftool map update)."""
    load(pin_root, "tcp", mode="audit")
    fd = pins.get(os.path.join(bpf.unit_dir(pin_root, UNIT), pc.MODE))
    try:
        maps.map_update(fd, pc.ZERO, bytes(pc.Mode(2)))
    finally:
        os.close(fd)
    assert bpf.stats(pin_root, UNIT)["mode"] == "enforce"


def test_each_map_is_described_once_per_open(pin_root, monkeypatch):
    load(pin_root, "dst_port in @s || dst_port in @t", sets={"s": "1", "t": "2"})
    calls = []
    real = maps.map_info
    monkeypatch.setattr(maps, "map_info", lambda fd: calls.append(fd) or real(fd))
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        u.change([("set", "s", "+", "3,4"), ("set", "t", "=", "5..9"), ("set", "s", "-", "1")])
        assert u.set_elements("s") == ["3", "4"] and u.set_elements("t") == ["5", "6", "7", "8", "9"]
        described = [fd for fd in calls if fd in u.maps.values()]
        assert len(described) == len(set(described)), calls  # none twice
        assert {u.maps["set_s"], u.maps["set_t"]} <= set(described)
