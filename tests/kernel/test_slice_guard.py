"""Slice defaults in the kernel (port_filter.c's guard, kept by the real `bpfwall watch`): real
cgroups, real UDP over loopback. A slice's default judges exactly the cgroups below it that
nothing deeper judges; a unit's own entry judges it alone, in each direction it filters.
"""
from __future__ import annotations

import os
import socket

import pytest

from bpfwall import program_contract as pc
from bpfwall.backends import bpf
from bpfwall.kernel import cgroup, pins
from tests.kernel.sockets import receive_all
from tests.kernel.watcher import inside, mkcg, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("no_leaks")]


def guard_entries(pin_root, entry) -> dict[int, frozenset]:
    """{cgroup id: directions judged below} of the slice default's pinned guard map."""
    fd = pins.get(os.path.join(bpf.unit_dir(pin_root, entry), pc.GUARD))
    try:
        from bpfwall.backends.bpf_guard import GuardMap

        g = GuardMap(fd)
        fd = -1
        try:
            return g.entries()
        finally:
            g.close()
    finally:
        if fd >= 0:
            os.close(fd)


def udp_in(path):
    """A UDP socket made inside cgroup `path` (its packets are that cgroup's), bound to a port."""
    with inside(path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def sent(tx, rx, n=5) -> int:
    """Datagrams from `tx` that reach `rx` (EPERM: dropped on egress)."""
    for _ in range(n):
        try:
            tx.sendto(b"x", rx.getsockname())
        except PermissionError:
            pass
    return receive_all(rx, 0.2)


def classified(pin_root, entry, path, below=frozenset()):
    return lambda: guard_entries(pin_root, entry).get(cgroup.cgroup_id(path)) == frozenset(below)


@pytest.fixture
def receivers():
    """Two receivers outside every policed cgroup: the allowed port and another one."""
    a, b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
    yield a, b
    a.close()
    b.close()


def test_deny_by_default_slice_allow_per_unit(daemon, policy_dir, subtree, pin_root, receivers):
    """`deny.slice` drops everything by default; dns.service's own entry lets its DNS-like UDP out
    (and its replies in) and nothing else; mute.service (no entry) sends and receives nothing; a
    unit outside the slice is untouched; egress-only.service's ingress falls to the default."""
    allowed, other = receivers
    port = allowed.getsockname()[1]
    write_policy(policy_dir, unit("deny.slice", ingress="false", egress="false")
                 + unit("dns.service", ingress=f"udp && remote_port == {port}", egress=f"udp && remote_port == {port}")
                 + unit("egress-only.service", egress="true"))
    dns = mkcg(subtree, "deny.slice/dns.service")
    mute = mkcg(subtree, "deny.slice/mute.service")
    eonly = mkcg(subtree, "deny.slice/egress-only.service")
    outside = mkcg(subtree, "free.slice/outside.service")
    daemon.start()
    socks = {name: udp_in(path) for name, path in (("dns", dns), ("mute", mute), ("eonly", eonly),
                                                   ("outside", outside))}
    try:
        assert sent(socks["dns"], allowed) == 5 and sent(socks["dns"], other) == 0
        assert sent(socks["mute"], allowed) == 0 and sent(socks["mute"], other) == 0
        assert sent(socks["eonly"], allowed) == 5 and sent(socks["eonly"], other) == 5
        assert sent(socks["outside"], allowed) == 5 and sent(socks["outside"], other) == 5
        # ingress: from the allowed port (the unit's entry passes it, the default would drop it)
        assert sent(allowed, socks["dns"]) == 5 and sent(other, socks["dns"]) == 0
        assert sent(allowed, socks["mute"]) == 0
        assert sent(allowed, socks["eonly"]) == 0  # ingress left out by its entry: the default judges it
        assert sent(other, socks["outside"]) == 5
        # the guard knows each descendant: which directions a deeper filter judges
        g = guard_entries(pin_root, "deny.slice")
        assert g[cgroup.cgroup_id(dns)] == {"ingress", "egress"}
        assert g[cgroup.cgroup_id(mute)] == set()
        assert g[cgroup.cgroup_id(eonly)] == {"egress"}
        assert cgroup.cgroup_id(outside) not in g
    finally:
        for s in socks.values():
            s.close()
    assert "error" not in daemon.log()
