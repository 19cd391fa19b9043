"""`bpfwall unload --all`, which the Debian package's removal runs: every unit goes, attached or not."""
from __future__ import annotations

import json

import pytest

from tests.kernel.invoke import bpfwall, one_error_line, pins_of

pytestmark = pytest.mark.kernel


def test_unload_all_detaches_and_unpins_every_unit(pin_root, temp_cgroup):
    for unit in ("a.service", "b.service"):
        assert bpfwall("load", unit, "--ingress", "icmp", "--egress", "udp").returncode == 0
    assert bpfwall("attach", "a.service", temp_cgroup.path).returncode == 0
    r = bpfwall("--backend", "bpf", "unload", "--all", "--json")
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert sorted((d["unit"], d["detached"]) for d in done["unloaded"]) == [("a.service", 2), ("b.service", 0)]
    assert (done["failed"], done["skipped"]) == ([], [])
    assert pins_of(pin_root) == []
    assert json.loads(bpfwall("list", "--json").stdout) == []
    again = bpfwall("--backend", "bpf", "unload", "--all")
    assert (again.returncode, again.stdout) == (0, "no units loaded\n")


def test_unload_wants_a_unit_or_all_not_both(pin_root):
    one_error_line(bpfwall("unload"), "give a UNIT or --all")
    one_error_line(bpfwall("unload", "a.service", "--all"), "give a UNIT or --all")
