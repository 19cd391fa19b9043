"""Slice defaults in the kernel (port_filter.c's guard, kept by the real `bpfwall watch`): real
cgroups, real UDP over loopback. A slice's default judges exactly the cgroups below it that
nothing deeper judges; a unit's own entry judges it alone, in each direction it filters.
"""
from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from bpfwall.backends import bpf
from bpfwall.backends.bpf_guard import GuardMap
from bpfwall.kernel import cgroup, pins
from tests.kernel.flood import Flood
from tests.kernel.invoke import bpfwall
from tests.kernel.sockets import receive_all, udp_receivers
from tests.kernel.watcher import inside, mkcg, pinned_ids, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("no_leaks")]


def guard_entries(pin_root, entry) -> dict[int, frozenset]:
    """{cgroup id: directions judged below} of the slice default's pinned guard maps."""
    with pins.PinDir.open(bpf.unit_dir(pin_root, entry)) as d:
        g = GuardMap.open(d)
        try:
            return g.entries()
        finally:
            g.close()


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
    with udp_receivers(2) as socks:
        yield socks


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


def test_nested_slices_the_inner_default_wins(daemon, policy_dir, subtree, pin_root, receivers):
    """outer.slice denies, inner.slice (inside it) allows one port: a unit in inner.slice is judged
    by inner's default alone, one directly in outer.slice by outer's."""
    allowed, other = receivers
    port = allowed.getsockname()[1]
    write_policy(policy_dir, unit("outer.slice", egress="false")
                 + unit("inner.slice", egress=f"udp && remote_port == {port}"))
    deep = mkcg(subtree, "outer.slice/inner.slice/x.service")
    shallow = mkcg(subtree, "outer.slice/y.service")
    daemon.start()
    with udp_in(deep) as d, udp_in(shallow) as s:
        assert (sent(d, allowed), sent(d, other)) == (5, 0)
        assert (sent(s, allowed), sent(s, other)) == (0, 0)
    inner = os.path.join(subtree, "outer.slice/inner.slice")
    assert guard_entries(pin_root, "outer.slice")[cgroup.cgroup_id(inner)] == {"egress"}


def test_a_glob_on_nested_slices_guards_once(daemon, policy_dir, subtree, pin_root, receivers):
    """`*.slice` is the default of a.slice and of a.slice/b.slice: one guard (on a.slice) judges
    both, so a packet is counted once."""
    allowed, _ = receivers
    port = allowed.getsockname()[1]
    write_policy(policy_dir, unit("*.slice", egress=f"udp && remote_port == {port}"))
    x = mkcg(subtree, "a.slice/b.slice/x.service")
    daemon.start()
    with bpf.PinnedUnit.open(pin_root, "*.slice") as u:
        ids = u.prog_ids()
    assert ids["egress"] in cgroup.query(os.path.join(subtree, "a.slice"), "egress")[1]
    assert ids["egress"] not in cgroup.query(os.path.join(subtree, "a.slice/b.slice"), "egress")[1]
    with udp_in(x) as s:
        assert sent(s, allowed, 7) == 7
    with bpf.PinnedUnit.open(pin_root, "*.slice") as u:
        assert u.counters()["egress"]["pass"]["packets"] == 7


def test_a_unit_holding_nearer_entries_judges_only_the_rest(daemon, policy_dir, subtree, pin_root):
    """mgr.service (a delegated unit, like user@1000.service) has its own entry and holds
    inner.slice, which has a default, and own.service, with its own entry: each cgroup is judged by
    the nearest entry alone, not by it AND mgr.service's (the watcher builds mgr.service's filter
    as a guard once it sees them). Restarted, the watcher keeps it a guard: nothing is rebuilt; so
    do `bpfwall apply` and a watcher restarted after its filter changed."""
    with udp_receivers(3) as rx:
        a, b, c = (s.getsockname()[1] for s in rx)
        write_policy(policy_dir, unit("mgr.service", egress=f"udp && remote_port == {a}")
                     + unit("inner.slice", egress=f"udp && remote_port == {b}")
                     + unit("own.service", egress=f"udp && remote_port == {c}"))
        mgr = mkcg(subtree, "host.slice/mgr.service")
        init = mkcg(subtree, "host.slice/mgr.service/init.scope")
        x = mkcg(subtree, "host.slice/mgr.service/inner.slice/x.service")
        own = mkcg(subtree, "host.slice/mgr.service/inner.slice/own.service")
        want = {mgr: (5, 0, 0), init: (5, 0, 0), x: (0, 5, 0), own: (0, 0, 5)}

        def check():
            for path, counts in want.items():
                with udp_in(path) as tx:
                    assert tuple(sent(tx, r) for r in rx) == counts, path

        daemon.start()
        inner = os.path.join(subtree, "host.slice/mgr.service/inner.slice")
        wait_for("the watcher says it made mgr.service a guard", lambda: "mgr.service: cgroups inside its own have "
                 "nearer entries" in daemon.log())
        def inner_below() -> bool:
            try:
                return guard_entries(pin_root, "mgr.service").get(cgroup.cgroup_id(inner)) == {"egress"}
            except (AttributeError, bpf.BackendError):  # not (yet) a guard: no guard map
                return False

        wait_for("mgr.service classifies what is below it", inner_below)
        check()
        assert guard_entries(pin_root, "mgr.service")[cgroup.cgroup_id(init)] == set()
        # a cgroup made later below inner.slice: judged by inner's default, at once
        late = mkcg(subtree, "host.slice/mgr.service/inner.slice/late.service")
        want[late] = (0, 5, 0)
        check()
        ids = pinned_ids(pin_root, "mgr.service")
        daemon.stop()
        daemon.start()
        check()
        assert pinned_ids(pin_root, "mgr.service") == ids  # reused as the guard it was
        assert "nearer entries" not in daemon.log() and "error" not in daemon.log()
        # the hand-off loader (`bpfwall apply`, bpfwall@.service) loads it from the policy: still a
        # guard, with its classes (no watcher running to mend it)
        daemon.stop()
        r = bpfwall("apply", "mgr.service", "--policy-dir", str(policy_dir), "--pin-root", pin_root)
        assert r.returncode == 0, r.stderr
        assert pinned_ids(pin_root, "mgr.service") != ids  # loaded again, swapped in place
        check()
        with bpf.PinnedUnit.open(pin_root, "mgr.service") as u:
            assert "slice_default" in u.meta
        # its filter changed while no watcher ran: the restarted one loads the new filter as a guard
        # at once (its pins say it is one), with its classes: right from the first packet
        write_policy(policy_dir, unit("mgr.service", egress=f"udp && (remote_port == {a} || remote_port == {c})")
                     + unit("inner.slice", egress=f"udp && remote_port == {b}")
                     + unit("own.service", egress=f"udp && remote_port == {c}"))
        want.update({mgr: (5, 0, 5), init: (5, 0, 5)})
        daemon.start()
        check()
        assert "nearer entries" not in daemon.log() and "error" not in daemon.log()


# -- strict slices: nothing unclassified gets out ---------------------------------------------

@pytest.fixture
def flood_receivers():
    """Two non-blocking receivers with room for a flood."""
    with udp_receivers(2, 64 << 20, blocking=False) as socks:
        yield socks


def drain(rx) -> int:
    n = 0
    while True:
        try:
            rx.recv(64)
        except BlockingIOError:
            return n
        n += 1


def test_a_glob_default_with_another_between_judges_once_and_is_handed_down_on_reload(
        daemon, policy_dir, subtree, pin_root, flood_receivers):
    """`*.slice` is the default of a.slice and of a.slice/m.slice/b.slice, with m.slice's own
    default between: the glob's guard sits on a.slice only and judges b.slice's cgroups from
    there (m.slice's guard passes them to it), so each packet is counted once. A reload that takes
    the glob off a.slice puts it on b.slice first: a flood from b.slice never reaches the port it
    may not send to, not even while the watcher moves it."""
    allowed, other = flood_receivers
    ports = [allowed.getsockname()[1], other.getsockname()[1]]
    glob = unit("*.slice", egress=f"udp && remote_port == {ports[0]}")
    write_policy(policy_dir, glob + unit("m.slice", egress="false"))
    x = mkcg(subtree, "a.slice/m.slice/b.slice/x.service")
    y = mkcg(subtree, "a.slice/m.slice/y.service")
    a, b = os.path.join(subtree, "a.slice"), os.path.join(subtree, "a.slice/m.slice/b.slice")
    daemon.start()
    glob_id = pinned_ids(pin_root, "*.slice")["egress"]
    assert glob_id in cgroup.query(a, "egress")[1] and glob_id not in cgroup.query(b, "egress")[1]
    for path, want in ((x, (7, 0)), (y, (0, 0))):
        with udp_in(path) as tx:
            for rx, n in zip((allowed, other), want, strict=True):
                for _ in range(7):
                    try:
                        tx.sendto(b"x", rx.getsockname())
                    except PermissionError:
                        pass
                time.sleep(0.05)
                assert drain(rx) == n, path
    with bpf.PinnedUnit.open(pin_root, "*.slice") as u:
        assert u.counters()["egress"]["pass"]["packets"] == 7 and u.counters()["egress"]["drop"]["packets"] == 7
    with bpf.PinnedUnit.open(pin_root, "m.slice") as u:
        assert u.counters()["egress"]["pass"]["packets"] == 0 and u.counters()["egress"]["drop"]["packets"] == 14
    flood = Flood(x, ports)
    try:
        wait_for("the flood's datagrams", lambda: drain(allowed))
        write_policy(policy_dir, unit("*.slice", egress=f"udp && remote_port == {ports[0]}",
                                      extra='cgroup = "m.slice/*"') + unit("m.slice", egress="false"))
        daemon.signal(signal.SIGHUP)
        wait_for("the glob on b.slice, not on a.slice",
                 lambda: glob_id in cgroup.query(b, "egress")[1] and glob_id not in cgroup.query(a, "egress")[1])
        time.sleep(0.1)
    finally:
        (sent_allowed, _), (sent_other, refused_other) = flood.stop()
    assert sent_other > 1000 and refused_other == sent_other and drain(other) == 0
    assert "error" not in daemon.log()


def strict_policy(allowed: int, other: int) -> str:
    """strict.slice's default lets `other` out; flood.service's own entry only `allowed`."""
    return (unit("strict.slice", egress=f"udp && remote_port == {other}", extra="strict = true")
            + unit("flood.service", egress=f"udp && remote_port == {allowed}"))


def test_strict_a_process_born_in_a_new_cgroup_sends_nothing_until_it_is_policed(
        daemon, policy_dir, subtree, pin_root, flood_receivers):
    """The watcher is frozen (SIGSTOP) while flood.service's cgroup is made and a process born in
    it floods both ports: nothing arrives. Thawed, the watcher attaches the unit's filter and
    classifies the cgroup: from then on exactly the allowed port's datagrams arrive, all of them.
    The same without freezing: not one datagram to the other port, ever."""
    allowed, other = flood_receivers
    ports = [allowed.getsockname()[1], other.getsockname()[1]]
    write_policy(policy_dir, strict_policy(*ports))
    mkcg(subtree, "strict.slice")
    daemon.start()
    path = os.path.join(subtree, "strict.slice/flood.service")

    daemon.signal(signal.SIGSTOP)
    try:
        os.mkdir(path)
        flood = Flood(path, ports)
        wait_for("the flood under way", lambda: flood_sent(flood))  # a few ms of flooding, unclassified
        time.sleep(0.05)
        assert (drain(allowed), drain(other)) == (0, 0)
    finally:
        daemon.signal(signal.SIGCONT)
    wait_for("flood.service classified", classified(pin_root, "strict.slice", path, {"egress"}))
    arrived_allowed = wait_for("allowed datagrams", lambda: drain(allowed))
    (sent_a, refused_a), (sent_o, refused_o) = flood.stop()
    arrived_allowed += drain(allowed)
    assert drain(other) == 0 and refused_o == sent_o
    assert arrived_allowed > 0 and arrived_allowed == sent_a - refused_a  # every one not refused arrived
    os.rmdir(path)

    for _ in range(20):  # unfrozen: the watcher's real pace
        os.mkdir(path)
        flood = Flood(path, ports)
        wait_for("flood.service classified", classified(pin_root, "strict.slice", path, {"egress"}))
        (sent_a, refused_a), (sent_o, refused_o) = flood.stop()
        assert refused_o == sent_o and drain(other) == 0
        assert drain(allowed) == sent_a - refused_a
        os.rmdir(path)
    assert "error" not in daemon.log()


def flood_sent(flood) -> bool:
    """True once the flood has had time to start (it sends from its first instant)."""
    time.sleep(0.02)
    return True


def test_strict_watcher_killed_new_cgroups_stay_dropped_until_it_is_back(
        daemon, policy_dir, subtree, pin_root, flood_receivers):
    """SIGKILL the watcher; cgroups made under the strict slice meanwhile (one with its own entry,
    one without) send nothing at all, however long it stays down. Restarted, it classifies them:
    flood.service sends to the allowed port only, other.service to the default's port only."""
    allowed, other = flood_receivers
    ports = [allowed.getsockname()[1], other.getsockname()[1]]
    write_policy(policy_dir, strict_policy(*ports))
    mkcg(subtree, "strict.slice")
    daemon.start()
    daemon.stop()  # SIGKILL, by PID
    own = mkcg(subtree, "strict.slice/flood.service")
    none = mkcg(subtree, "strict.slice/other.service")
    floods = [Flood(own, ports), Flood(none, ports)]
    time.sleep(0.2)
    assert (drain(allowed), drain(other)) == (0, 0)
    daemon.start()
    wait_for("both classified", lambda: classified(pin_root, "strict.slice", own, {"egress"})()
             and classified(pin_root, "strict.slice", none)())
    wait_for("datagrams to both ports", lambda: drain(allowed) and drain(other))
    (a_own, o_own), (a_none, o_none) = (f.stop() for f in floods)
    assert o_own[1] == o_own[0] and a_none[1] == a_none[0]  # to the port each may not: all refused
    assert a_own[1] < a_own[0] and o_none[1] < o_none[0]
    assert "error" not in daemon.log()


# -- the guard's maps and program, without a watcher --------------------------------------------

def test_a_class_whose_slot_is_taken_goes_to_the_hash_and_the_program_finds_it(tmp_path):
    """Another id holds the slot of this cgroup's id: its class lives in guard_more, the program
    finds it there; freed, the slot is taken by the next id that needs it. Packets run through the
    loaded guard (BPF_PROG_TEST_RUN: its socket is this process's, in a cgroup of the test's own)."""
    from bpfwall.build import UnitProgram, build
    from bpfwall.kernel import loader, maps, progs
    from bpfwall.lang.checker import analyze
    from bpfwall.sandbox import TempCgroup
    from bpfwall import program_contract as pc

    udp53 = bytes.fromhex("4500001c00000000401100000a0000010a0000029c40003500080000")
    data = b"\0" * 12 + b"\x08\x00" + udp53
    obj = build(UnitProgram(analyze("false"), analyze("false"), slice_default=True, strict=True), cache=tmp_path)
    loaded = loader.load(obj)
    try:
        g = GuardMap(os.dup(loaded.maps[pc.GUARD]), os.dup(loaded.maps[pc.GUARD_MORE]))
        egress = loaded.progs["cgroup_skb/egress"]
        with TempCgroup("bpfwall-test", suffix=".slice") as sl, TempCgroup(name="x.service", parent=sl.path) as x:
            cgid = cgroup.cgroup_id(x.path)
            squatter = cgid + pc.GUARD_SLOTS  # the same slot
            with x.entered():
                assert progs.prog_test_run(egress, data)[0] == 0  # strict, unclassified: dropped
                g.classify(squatter, [])
                g.classify(cgid, ["egress"])
                assert cgid in dict(pc.decode_guard(k, v) for k, v in maps.Map(loaded.maps[pc.GUARD_MORE]).items())
                assert progs.prog_test_run(egress, data)[0] == 1  # judged below, found in the hash
                g.classify(cgid, [])
                assert progs.prog_test_run(egress, data)[0] == 0  # judged by the default: false
                assert g.forget(squatter) and g.forget(cgid)
                assert g.entries() == {}
                g.classify(cgid, ["ingress", "egress"])  # the freed slot
                assert pc.decode_guard_slot(maps.Map(loaded.maps[pc.GUARD]).lookup(pc.guard_index(cgid))) \
                    == (cgid, {"ingress", "egress"})
                assert progs.prog_test_run(egress, data)[0] == 1
                g.classify(cgid, ["ingress"])
                assert progs.prog_test_run(egress, data)[0] == 0
                # a sub-cgroup the watcher has not seen: its parent's class speaks for it
                with TempCgroup(name="worker", parent=x.path) as w, w.entered():
                    assert progs.prog_test_run(egress, data)[0] == 0  # strict: egress not below → dropped
                    g.classify(cgid, ["egress"])
                    assert progs.prog_test_run(egress, data)[0] == 1  # inside a unit judged below
            g.close()
    finally:
        loaded.close()
