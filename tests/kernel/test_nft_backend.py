"""The nft backend with real nftables and real packets on loopback.

Each test has its own table (`bpfwall-test-<uuid>`) and state directory and
deletes the table even when it fails. Sockets belong to the cgroup of the
process that created them (TempCgroup.socket); the nft rules match them with
`socket cgroupv2`. On this hybrid host every nft call that names a cgroup runs
in the mount-namespace worker, so every test here exercises it.

ICMP ingress is not policed by the nft backend: in the input hook, nft's socket
lookup finds TCP and UDP sockets only, so an incoming ICMP packet matches no
cgroup (test_icmp_ingress_is_not_policed pins this down).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from bpfwall.backends import nft
from bpfwall.build import UnitProgram
from bpfwall.kernel import cgroup
from bpfwall.lang.checker import analyze_pair
from bpfwall.nft import runner
from bpfwall.nft.errors import NftError
from bpfwall.nft.state import StateFile
from bpfwall.sandbox import TempCgroup
from tests.kernel.sockets import SO_RCVBUFFORCE, V4, V6, bound, ping, receive_all

pytestmark = [pytest.mark.kernel, pytest.mark.traffic]


def program(ingress=None, egress=None) -> UnitProgram:
    return UnitProgram(*analyze_pair(ingress, egress))


def test_tables() -> set[str]:
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {t["table"]["name"] for t in json.loads(out)["nftables"]
            if "table" in t and t["table"]["name"].startswith("bpfwall-test")}


test_tables.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module", autouse=True)
def no_test_tables_left():
    before = test_tables()
    yield
    assert test_tables() <= before, "a test left its nft table behind"


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft-state"))
    name = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        try:
            nft.destroy(name)
        finally:
            subprocess.run(["nft", "delete", "table", "inet", name], capture_output=True)


def snapshot(table: str):
    """The table as nft lists it, and the state file: what 'nothing changed' compares."""
    out = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True)
    sf = StateFile(table)
    state = open(sf.path).read() if os.path.exists(sf.path) else None
    return out.stdout, state


def load_attached(table, cg, unit="t.service", **exprs):
    nft.load(table, unit, program(**exprs))
    nft.attach(table, unit, cg.path)
    return unit


def counters(table, unit):
    return nft.stats(table, unit)["counters"]


def header(family) -> int:
    return 20 if family == socket.AF_INET else 40


# -- packets --------------------------------------------------------------------

def _udp_exchange(cg, host, family, direction):
    """Datagrams to an allowed and a denied port, the policed sockets being the receivers
    (ingress) or the sender (egress); (delivered allowed, delivered denied, refused sends)."""
    policed = cg if direction == "ingress" else None
    ok, no = bound(policed, host, family), bound(policed, host, family)
    tx = cg.socket(family, socket.SOCK_DGRAM) if direction == "egress" else socket.socket(family, socket.SOCK_DGRAM)
    with ok, no, tx:
        refused = 0
        yield ok.getsockname()[1], no.getsockname()[1]
        for _ in range(10):
            for port in (ok.getsockname()[1], no.getsockname()[1]):
                try:
                    tx.sendto(b"x" * 10, (host, port))
                except PermissionError:  # an nft drop in the output hook reports EPERM to the sender
                    refused += 1
        yield receive_all(ok), receive_all(no), refused


def _tcp_exchange(cg, host, family, direction):
    """Connections to an allowed and a denied listener (policed: the listeners on ingress,
    the client on egress); (connected allowed, connected denied, 0)."""
    policed = cg if direction == "ingress" else None
    ok, no = bound(policed, host, family, socket.SOCK_STREAM), bound(policed, host, family, socket.SOCK_STREAM)
    with ok, no:
        ok.listen(4)
        no.listen(4)
        yield ok.getsockname()[1], no.getsockname()[1]
        results = []
        for listener in (ok, no):
            client = cg.socket(family, socket.SOCK_STREAM) if direction == "egress" else socket.socket(family, socket.SOCK_STREAM)
            client.settimeout(0.5)
            with client:
                try:
                    client.connect(listener.getsockname()[:2])
                    conn, _ = listener.accept()
                    with conn:
                        client.sendall(b"hello")
                        results.append(conn.recv(10) == b"hello")
                except OSError:
                    results.append(False)
        yield results[0], results[1], 0


@pytest.mark.parametrize("direction", ["ingress", "egress"])
@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_traffic(table, temp_cgroup, proto, host, family, direction):
    exchange = (_udp_exchange if proto == "udp" else _tcp_exchange)(temp_cgroup, host, family, direction)
    allowed, denied = next(exchange)
    port = "local_port" if direction == "ingress" else "remote_port"
    unit = load_attached(table, temp_cgroup, **{direction: f"{proto} && {port} == {allowed}"})
    got_allowed, got_denied, refused = next(exchange)
    c = counters(table, unit)[direction]
    if proto == "udp":
        assert (got_allowed, got_denied) == (10, 0)
        assert refused == (10 if direction == "egress" else 0)
        size = header(family) + 8 + 10
        assert c == {"pass": {"packets": 10, "bytes": 10 * size}, "drop": {"packets": 10, "bytes": 10 * size}}
    else:
        assert (got_allowed, got_denied) == (True, False)
        assert c["pass"]["packets"] >= 3 and c["drop"]["packets"] >= 1


def test_icmp_egress(table, temp_cgroup):
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        unit = load_attached(table, temp_cgroup, egress="icmp && icmp_type == 8 && icmp_code == 0")
        assert ping(s) == 3
        nft.load(table, unit, program(egress="!icmp"))
        assert ping(s) == 0  # requests dropped on egress
        c = counters(table, unit)["egress"]
        assert c["pass"]["packets"] == 3 and c["drop"]["packets"] == 3


def test_icmp_ingress_is_not_policed(table, temp_cgroup):
    """nft's socket lookup in the input hook knows TCP and UDP only: ICMP replies reach the
    cgroup's raw socket although its ingress filter is `false`, and nothing is counted."""
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        unit = load_attached(table, temp_cgroup, ingress="false")
        assert ping(s) == 3
        assert counters(table, unit)["ingress"]["drop"]["packets"] == 0


def test_absent_ports_read_zero_on_real_icmp(table, temp_cgroup):
    """`dst_port == 0` holds for ICMP (no ports); `dst_port != 0` does not."""
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        unit = load_attached(table, temp_cgroup, egress="dst_port == 0 && src_port < 1")
        assert ping(s) == 3
        nft.load(table, unit, program(egress="!(dst_port == 0)"))
        assert ping(s) == 0


def test_audit_mode_passes_and_counts(table, temp_cgroup):
    """Audit: everything arrives, what the filter would drop is counted; then enforce, live."""
    unit = "audit.service"
    for mode, delivered, drops in (("audit", (10, 10), 10), ("enforce", (10, 0), 20)):
        exchange = _udp_exchange(temp_cgroup, *V4, "ingress")
        allowed, _ = next(exchange)
        if mode == "audit":
            nft.load(table, unit, program(ingress=f"udp && local_port == {allowed}"), mode="audit")
            nft.attach(table, unit, temp_cgroup.path)
        else:
            assert nft.set_values(table, unit, [("mode", "enforce")]) == ["mode = enforce"]
            nft.set_values(table, unit, [])  # a no-op change re-renders too: counters survive it
            nft.load(table, unit, program(ingress=f"udp && local_port == {allowed}"))  # reload keeps mode
        assert next(exchange)[:2] == delivered
        assert nft.stats(table, unit)["mode"] == mode
        assert counters(table, unit)["ingress"]["drop"]["packets"] == drops


def test_params_change_atomically_under_traffic(table, temp_cgroup):
    """Re-rendering a unit for a param change is one transaction: traffic that every version
    allows loses nothing while $other changes 40 times; the changed param takes effect."""
    rx = temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    rx.bind(("127.0.0.1", 0))
    other = bound(temp_cgroup, *V4)
    port, other_port = rx.getsockname()[1], other.getsockname()[1]
    unit = "p.service"
    nft.load(table, unit, program(ingress="udp && local_port in {$keep, $other}"),
             params={"keep": port, "other": 1})
    nft.attach(table, unit, temp_cgroup.path)
    total, changes = 8000, 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(total):  # the receive buffer holds them all: read them afterwards
            tx.sendto(b"p", ("127.0.0.1", port))
            if i % 200 == 100:
                nft.set_values(table, unit, [("param", "other", 1000 + i)])
                changes += 1
    received = receive_all(rx)
    rx.close()
    assert changes == 40 and received == total
    assert counters(table, unit)["ingress"]["pass"]["packets"] == total
    with other, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(b"x", ("127.0.0.1", other_port))
        assert receive_all(other) == 0
        nft.set_values(table, unit, [("param", "other", other_port)])
        tx.sendto(b"x", ("127.0.0.1", other_port))
        assert receive_all(other) == 1
    assert nft.stats(table, unit)["params"] == {"keep": port, "other": other_port}


def test_sets_edited_live(table, temp_cgroup):
    a, b = bound(temp_cgroup, *V4), bound(temp_cgroup, *V6)
    with a, b, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx4, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx6:
        pa, pb = a.getsockname()[1], b.getsockname()[1]
        unit = "s.service"
        nft.load(table, unit, program(ingress="udp && local_port in @ports && remote_addr in @peers"),
                 sets={"ports": [pa], "peers": [__import__("ipaddress").ip_network("127.0.0.0/8")]})
        nft.attach(table, unit, temp_cgroup.path)

        def deliver():
            tx4.sendto(b"x", ("127.0.0.1", pa))
            tx6.sendto(b"x", ("::1", pb))
            return receive_all(a, 0.2), receive_all(b, 0.2)

        assert deliver() == (1, 0)
        assert nft.set_values(table, unit, [("set", "ports", "+", f"{pb}"), ("set", "peers", "+", "::1")]) == \
            ["@ports: added 1", "@peers: added 1"]
        assert deliver() == (1, 1)
        nft.set_values(table, unit, [("set", "ports", "-", f"{pa}")])
        assert deliver() == (0, 1)
        nft.set_values(table, unit, [("set", "peers", "=", "10.0.0.0/8")])
        assert deliver() == (0, 0)
        s = nft.stats(table, unit)
        assert s["sets"] == {"peers": ["10.0.0.0/8"], "ports": [str(pb)]}
        assert s["counters"]["ingress"]["pass"]["packets"] == 4


def test_zero_in_a_set_matches_packets_without_ports(table, temp_cgroup):
    """Adding 0 to a port set changes which rules exist: ICMP (ports read 0) now passes."""
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        unit = "z.service"
        nft.load(table, unit, program(egress="dst_port in @ports"), sets={"ports": [53]})
        nft.attach(table, unit, temp_cgroup.path)
        assert ping(s) == 0
        nft.set_values(table, unit, [("set", "ports", "+", "0")])
        assert ping(s) == 3
        nft.set_values(table, unit, [("set", "ports", "-", "0..10")])
        assert ping(s) == 0


def test_the_nearest_unit_judges_alone(table):
    """Units attached at a parent and at a child cgroup: the child's sockets are judged by the
    child's unit alone (its verdict ends the dispatch, deepest level first), whichever verdict
    the parent's would give; a sibling without a unit of its own falls to the parent's
    (policy/judge.py: a slice default)."""
    with TempCgroup("bpfwall-test") as parent:
        child, sibling = os.path.join(parent.path, "child"), os.path.join(parent.path, "sibling")
        os.mkdir(child)
        os.mkdir(sibling)
        try:
            x, y, z = _socket_in(child), _socket_in(child), _socket_in(sibling)
            with x, y, z, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                px, py, pz = (s.getsockname()[1] for s in (x, y, z))
                # the parent's default lets only y and z in, the child's unit only x
                nft.load(table, "slice.slice", program(ingress=f"udp && local_port in {{{py}, {pz}}}"))
                nft.load(table, "svc.service", program(ingress=f"udp && local_port == {px}"))
                nft.attach(table, "slice.slice", parent.path)
                nft.attach(table, "svc.service", child)
                for port in (px, py, pz):
                    tx.sendto(b"x", ("127.0.0.1", port))
                assert (receive_all(x, 0.2), receive_all(y, 0.2), receive_all(z, 0.2)) == (1, 0, 1)
                assert counters(table, "slice.slice")["ingress"] == {
                    "pass": {"packets": 1, "bytes": 29}, "drop": {"packets": 0, "bytes": 0}}
                assert counters(table, "svc.service")["ingress"] == {
                    "pass": {"packets": 1, "bytes": 29}, "drop": {"packets": 1, "bytes": 29}}
                assert _dispatch_jumps(table, "input") == [f"input_level_{_level(child)}",
                                                             f"input_level_{_level(parent.path)}"]
                # the child's unit gone: its sockets fall to the parent's default
                nft.unload(table, "svc.service")
                assert _dispatch_jumps(table, "input") == [f"input_level_{_level(parent.path)}"]
                for port in (px, py):
                    tx.sendto(b"x", ("127.0.0.1", port))
                assert (receive_all(x, 0.2), receive_all(y, 0.2)) == (0, 1)
                nft.unload(table, "slice.slice")
        finally:
            os.rmdir(child)
            os.rmdir(sibling)


def test_a_strict_default_holds_what_the_watcher_has_not_classified(table):
    """A strict slice default: a cgroup made below its slice after the attach is dropped (held)
    until it is classified — then the default judges it — or until its own unit is attached,
    which judges it alone; deeper cgroups too; the hold survives a restore, and unclassify or a
    reload keep it; unload leaves no held object behind."""
    with TempCgroup("bpfwall-test") as parent:
        fresh, own = os.path.join(parent.path, "fresh"), os.path.join(parent.path, "own")
        deeper = os.path.join(fresh, "deeper")
        made = []
        try:
            nft.load(table, "s.slice", program(ingress="udp"), strict=True)
            nft.attach(table, "s.slice", parent.path)
            for path in (fresh, own, deeper):  # created after the attach: nothing classified them
                os.mkdir(path)
                made.append(path)
            a, b, c, p = _socket_in(fresh), _socket_in(own), _socket_in(deeper), _socket_in(parent.path)
            with a, b, c, p, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                def arrived() -> tuple:
                    for s in (a, b, c, p):
                        tx.sendto(b"x", s.getsockname())
                    return tuple(receive_all(s, 0.2) for s in (a, b, c, p))

                assert arrived() == (0, 0, 0, 1)  # the slice itself is known from the attach
                held = StateFile(table).load().units["s.slice"]
                assert nft.classify(table, "s.slice", fresh) and not nft.classify(table, "s.slice", fresh)
                assert arrived() == (1, 0, 0, 1)  # deeper: one level below the deepest known, still held
                nft.load(table, "own.service", program(ingress="udp && local_port == 1"))
                nft.attach(table, "own.service", own)  # its own unit judges it (and drops)
                assert arrived() == (1, 0, 0, 1) and counters(table, "own.service")["ingress"]["drop"]["packets"] >= 1
                assert nft.classify(table, "s.slice", deeper)
                assert arrived() == (1, 0, 1, 1)
                assert _held_packets(table, "s.slice") >= 3
                # held drops are the default's drops in stats, as on bpf (the default itself dropped none:
                # everything it judged was UDP)
                assert counters(table, "s.slice")["ingress"]["drop"]["packets"] == _held_packets(table, "s.slice")
                nft.restore(table)  # rebuilt from the state: what is known stays known
                assert arrived() == (1, 0, 1, 1)
                nft.load(table, "s.slice", program(ingress="udp || tcp"), strict=True)  # a reload keeps it too
                assert arrived() == (1, 0, 1, 1)
                assert nft.unclassify(table, "s.slice", os.stat(fresh).st_ino)
                assert arrived() == (0, 0, 0, 1)  # deeper too: an ancestor of it is no longer known
                nft.load(table, "s.slice", program(ingress="udp"), strict=False)  # no longer strict: all judged
                assert arrived() == (1, 0, 1, 1)
                assert not any(n.startswith(("held_", "known_")) for n in _objects(table))
                nft.load(table, "s.slice", program(ingress="udp"), strict=True)
                assert arrived() == (0, 0, 0, 1)  # strict again: nothing below is known
                nft.unload(table, "own.service")
                nft.unload(table, "s.slice")
            assert held.strict and [k.cgroup for k in held.known][-1] == os.path.relpath(parent.path,
                                                                                        cgroup.cgroup2_mount())
        finally:
            for path in reversed(made):
                os.rmdir(path)


def _objects(table: str) -> set[str]:
    """Names of the table's chains, sets and counters (an empty set when the table is gone)."""
    r = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True)
    if r.returncode != 0:
        return set()
    return {o[k]["name"] for o in json.loads(r.stdout)["nftables"] for k in ("chain", "set", "counter") if k in o}


def _held_packets(table: str, unit: str) -> int:
    from bpfwall.nft.names import UnitNames

    name = UnitNames(unit).held_counter("ingress")
    out = subprocess.run(["nft", "-j", "list", "counter", "inet", table, name], capture_output=True, text=True,
                         check=True).stdout
    return next(o["counter"]["packets"] for o in json.loads(out)["nftables"] if "counter" in o)


def _level(path: str) -> int:
    return os.path.relpath(path, cgroup.cgroup2_mount()).count("/") + 1


def _dispatch_jumps(table: str, chain: str) -> list[str]:
    """The level chains the dispatch jumps to, in order."""
    out = subprocess.run(["nft", "-j", "list", "chain", "inet", table, chain], capture_output=True, text=True,
                         check=True).stdout
    return [e["jump"]["target"] for r in json.loads(out)["nftables"] if "rule" in r
            for e in r["rule"]["expr"] if "jump" in e]


def _socket_in(path: str) -> socket.socket:
    home = open("/proc/self/cgroup").read().split("0::", 1)[1].split("\n", 1)[0]
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    finally:
        with open(os.path.join(cgroup.cgroup2_mount(), home.lstrip("/"), "cgroup.procs"), "w") as f:
            f.write("0")
    s.bind(("127.0.0.1", 0))
    return s


def _low_port_sockets(family, addresses_ports) -> list[socket.socket]:
    """UDP sockets bound (SO_REUSEPORT, so a sender may share a receiver's port) to low ports,
    shifted together until all are free: `len` and ports can meet there."""
    for shift in range(0, 400, 7):
        out = []
        try:
            for addr, port in addresses_ports:
                s = socket.socket(family, socket.SOCK_DGRAM)
                out.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((addr, port + shift))
            return out
        except OSError:
            for s in out:
                s.close()
    raise RuntimeError("no free low UDP ports")


RELATIONS = ["src_port < dst_port", "src_port == dst_port", "dst_port >= src_port", "len < dst_port",
             "len >= src_port", "dst_port <= len", "len == src_port", "saddr == daddr",
             "local_addr != remote_addr", "len in @s || dst_port in @s", "src_port > $p && len <= $p",
             "!(dst_port in 1000..1200) && len != $p", "icmp_type < icmp_code || len > icmp_type"]


@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
def test_relations_agree_with_the_evaluator_on_real_packets(table, temp_cgroup, host, family):
    """The lowerings nft cannot check for us (byte-pair concatenated sets, `meta length >> 8`
    in interval sets, raw header offsets, param folding) against the reference evaluator,
    on real datagrams whose length crosses the port numbers."""
    from bpfwall.lang.checker import analyze
    from bpfwall.lang.evaluator import evaluate
    from bpfwall.lang.packet import parse_packet
    from tests.unit import packets as pk

    other = "127.0.0.2" if family == socket.AF_INET else host  # saddr == daddr both ways on IPv4
    receivers = _low_port_sockets(family, [(host, 1100), (host, 1137), (host, 1240)])
    with temp_cgroup.entered():  # equal to, between and above the receivers' ports
        senders = _low_port_sockets(family, [(host, 1100), (other, 1160), (host, 1300)])
    params, sets = {"p": 1200}, {"s": [1150, (1200, 1250)]}
    unit, checked, outcomes = "rel.service", 0, set()
    try:
        for i, expr in enumerate(RELATIONS):
            prog = program(egress=expr)
            nft.load(table, unit, prog, params={n: params[n] for n in prog.params},
                     sets={n: sets[n] for n in prog.sets})
            if i == 0:
                nft.attach(table, unit, temp_cgroup.path)
            tree = analyze(expr).expr
            for tx in senders:
                for rx in receivers:
                    (saddr, sport), dport = tx.getsockname()[:2], rx.getsockname()[1]
                    for size in (1060, dport - 28, dport - 48, dport - 47, 1200 - 28):
                        payload = b"x" * max(size, 0)
                        try:
                            tx.sendto(payload, (host, dport))
                            passed = True
                        except PermissionError:
                            passed = False
                        ip = pk.ipv4 if family == socket.AF_INET else pk.ipv6
                        packet = ip(saddr, host, pk.UDP, pk.udp(sport, dport, payload))
                        expected = evaluate(tree, parse_packet(packet), "egress", params, sets)
                        assert passed == expected, (expr, sport, dport, len(packet))
                        outcomes.add((expr, passed))
                        checked += 1
    finally:
        for s in receivers + senders:
            s.close()
    assert checked == len(RELATIONS) * 9 * 5
    decided_both_ways = {e for e in RELATIONS if (e, True) in outcomes and (e, False) in outcomes}
    constant = {"icmp_type < icmp_code || len > icmp_type"}  # UDP: icmp fields read 0, len > 0
    if family == socket.AF_INET6:
        constant |= {"saddr == daddr", "local_addr != remote_addr"}  # only ::1 to ::1
    assert decided_both_ways == set(RELATIONS) - constant


def test_icmp_relations_agree_with_the_evaluator(table, temp_cgroup):
    from bpfwall.lang.checker import analyze
    from bpfwall.lang.evaluator import evaluate
    from bpfwall.lang.packet import parse_packet
    from tests.unit import packets as pk

    exprs = ["icmp_type < icmp_code", "len > icmp_type", "icmp_code == len", "icmp_type in @s",
             "icmp_type >= icmp_code && dst_port == 0", "len <= icmp_code || icmp_type == $p"]
    outcomes = set()
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        for i, expr in enumerate(exprs):
            prog = program(egress=expr)
            nft.load(table, "icmp.service", prog, params={"p": 40} if prog.params else {},
                     sets={"s": [(30, 45), 200]} if prog.sets else {})
            if i == 0:
                nft.attach(table, "icmp.service", temp_cgroup.path)
            tree = analyze(expr).expr
            for type_, code, size in ((8, 0, 0), (40, 41, 2), (41, 40, 13), (30, 60, 20), (200, 29, 2),
                                      (0, 255, 200), (255, 0, 300), (44, 44, 16)):
                message = pk.icmp(type_, code) + b"\0" * size
                try:
                    s.sendto(message, ("127.0.0.1", 0))
                    passed = True
                except PermissionError:
                    passed = False
                expected = evaluate(tree, parse_packet(pk.ipv4("127.0.0.1", "127.0.0.1", pk.ICMP, message)),
                                    "egress", {"p": 40}, {"s": [(30, 45), 200]})
                assert passed == expected, (expr, type_, code, 28 + size)
                outcomes.add((expr, passed))
    assert len(outcomes) == 2 * len(exprs)  # every expression both passed and dropped something


# -- layout -----------------------------------------------------------------------

def _rules(table: str, chain: str) -> list:
    out = runner.runner().json([{"list": {"chain": {"family": "inet", "table": table, "name": chain}}}])
    return [x["rule"] for x in out["nftables"] if "rule" in x]


def test_a_thousand_cgroups_one_rule_per_level(table):
    """1,000 attachments of one unit: still one dispatch rule per level; attach latency printed."""
    nft.load(table, "many.service", program(ingress="udp && local_port == 53", egress="tcp"))
    with TempCgroup("bpfwall-test") as parent:
        children = [os.path.join(parent.path, f"c{i}") for i in range(1000)]
        try:
            for c in children:
                os.mkdir(c)
            times = []
            for c in children:
                t0 = time.perf_counter()
                assert nft.attach(table, "many.service", c) == {"ingress": True, "egress": True}
                times.append(time.perf_counter() - t0)
            times.sort()
            print(f"\nnft attach latency over 1000 cgroups: p50 {times[500] * 1e3:.2f} ms, "
                  f"p99 {times[990] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms")
            for chain in ("input_level_2", "output_level_2"):
                rules = _rules(table, chain)
                assert len(rules) == 1, rules
            assert nft.attach(table, "many.service", children[7]) == {"ingress": False, "egress": False}
            s = nft.stats(table, "many.service")
            assert len(s["attached"]) == 2000
            # the sockets of one child are filtered like any other
            rx = _socket_in(children[999])
            with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"x", rx.getsockname())
                assert receive_all(rx, 0.2) == 0
            for c in children[:500]:
                nft.detach(table, "many.service", c)
            assert len(nft.stats(table, "many.service")["attached"]) == 1000
            nft.unload(table, "many.service")
            assert table not in test_tables()
        finally:
            for c in children:
                if os.path.isdir(c):
                    os.rmdir(c)


def test_hybrid_host_uses_the_worker(table, temp_cgroup):
    if cgroup.cgroup2_mount() == "/sys/fs/cgroup":
        pytest.skip("unified host: libnftables runs in-process")
    assert isinstance(runner.runner(), runner.Worker)
    # relative names work as with the BPF backend; the element is the path below the cgroup2 root
    load_attached(table, temp_cgroup, ingress="udp")
    rel = os.path.relpath(temp_cgroup.path, cgroup.cgroup2_mount())
    out = runner.runner().json([{"list": {"map": {"family": "inet", "table": table, "name": "ingress_level_1"}}}])
    elements = [e[0] for e in next(x["map"] for x in out["nftables"] if "map" in x)["elem"]]
    assert elements == [rel]
    assert nft.detach(table, "t.service", "/" + rel) == {"ingress": True}


def test_reload_moves_directions(table, temp_cgroup):
    unit = load_attached(table, temp_cgroup, ingress="udp")
    result = nft.load(table, unit, program(egress="udp"))
    assert result.detached == [(temp_cgroup.path, "ingress")]
    assert result.attached == [(temp_cgroup.path, "egress")]
    assert nft.stats(table, unit)["attached"] == [{"cgroup": temp_cgroup.path, "direction": "egress"}]
    assert _rules(table, "output_level_1") and "input_level_1" not in _chains(table)
    result = nft.load(table, unit, program(egress="tcp"))
    assert result.replaced == [(temp_cgroup.path, "egress")]


def _chains(table: str) -> set[str]:
    out = runner.runner().json([{"list": {"chains": {"family": "inet"}}}])
    return {x["chain"]["name"] for x in out["nftables"] if "chain" in x and x["chain"]["table"] == table}


def test_detach_a_vanished_cgroup(table):
    with TempCgroup("bpfwall-test") as cg:
        unit = load_attached(table, cg, ingress="udp")
    assert nft.detach(table, unit, cg.path) == {"ingress": True}
    assert nft.stats(table, unit)["attached"] == []
    assert "input_level_1" not in _chains(table)  # the empty level went with it


def test_a_vanished_cgroup_is_not_damage(table):
    """The guard's health check (every element of the state in its map) does not call for a
    restore, which rebuilds the whole table, when cgroups vanished, whether their elements are
    still there or a detach refilled the map without them; a live cgroup's missing element does."""
    with TempCgroup("bpfwall-test") as a, TempCgroup("bpfwall-test") as b, TempCgroup("bpfwall-test") as c:
        load_attached(table, a, ingress="udp")
        nft.attach(table, "t.service", b.path)
        nft.attach(table, "t.service", c.path)
    with TempCgroup("bpfwall-test") as live:
        nft.attach(table, "t.service", live.path)
        assert not nft.restore_if_needed(table) and not nft.restore_if_needed(table, deep=True)
        nft.detach(table, "t.service", a.path)  # vanished: its level's map is refilled, without b and c
        assert not nft.restore_if_needed(table) and not nft.restore_if_needed(table, deep=True)
        subprocess.run(["nft", "flush", "map", "inet", table, "ingress_level_1"], check=True)
        assert nft.restore_if_needed(table)  # live's element is back; the vanished records are pruned
        assert nft.stats(table, "t.service")["attached"] == [{"cgroup": live.path, "direction": "ingress"}]
        assert not nft.restore_if_needed(table, deep=True)


def test_unload_and_list(table, temp_cgroup):
    unit = load_attached(table, temp_cgroup, ingress="udp", egress="tcp")
    nft.load(table, "other.service", program(ingress="icmp"))
    assert nft.units(table) == ["other.service", unit]
    rows = {r["unit"]: r for r in nft.summary(table)}
    assert rows[unit]["attached"] == [{"cgroup": temp_cgroup.path, "direction": "ingress"},
                                      {"cgroup": temp_cgroup.path, "direction": "egress"}]
    assert nft.unload(table, unit) == [(temp_cgroup.path, "ingress"), (temp_cgroup.path, "egress")]
    assert nft.units(table) == ["other.service"]
    assert not any(c.startswith("t.service/") for c in _chains(table))
    nft.unload(table, "other.service")
    assert table not in test_tables() and not os.path.exists(StateFile(table).path)


def test_restore_after_deletion(table, temp_cgroup):
    rx = bound(temp_cgroup, *V4)
    with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        load_attached(table, temp_cgroup, ingress="tcp")
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
        tx.sendto(b"x", rx.getsockname())
        assert receive_all(rx, 0.2) == 1  # no table, no filter
        assert nft.restore(table) == {"table": table, "units": ["t.service"], "attached": 1}
        tx.sendto(b"x", rx.getsockname())
        assert receive_all(rx, 0.2) == 0


def test_operations_restore_a_missing_table_first(table, temp_cgroup):
    """A change to a unit while the table is gone brings back the other units too."""
    load_attached(table, temp_cgroup, ingress="tcp")
    nft.load(table, "b.service", program(ingress="udp"))
    subprocess.run(["nft", "delete", "table", "inet", table], check=True)
    nft.set_values(table, "b.service", [("mode", "audit")])
    assert {"t.service/in", "b.service/in", "input_level_1"} <= _chains(table)


def test_attach_restores_a_missing_table(table, temp_cgroup):
    """attach skips the health check (the watcher's hot path): a failed transaction restores."""
    with TempCgroup("bpfwall-test") as second:
        load_attached(table, temp_cgroup, ingress="tcp")
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)
        assert nft.attach(table, "t.service", second.path) == {"ingress": True}
        out = runner.runner().json([{"list": {"map": {"family": "inet", "table": table, "name": "ingress_level_1"}}}])
        assert len(next(x["map"] for x in out["nftables"] if "map" in x)["elem"]) == 2
        nft.unload(table, "t.service")


# -- bad input changes nothing ---------------------------------------------------------

def test_bad_input_changes_nothing(table, temp_cgroup):
    unit = load_attached(table, temp_cgroup, ingress="udp && local_port in @p && dst_port != $x")
    nft.set_values(table, unit, [("set", "p", "=", "80")])
    before = snapshot(table)
    deep = "tcp"
    for i in range(7):  # every level with two deep operands: more chain levels than nft allows
        deep = f"({deep} {'&&' if i % 2 else '||'} !{deep} {'&&' if i % 2 else '||'} udp)"
    bad = [
        lambda: nft.load(table, unit, program(ingress=deep)),
        lambda: nft.load(table, unit, program(ingress="udp"), params={"nope": 1}),
        lambda: nft.load(table, unit, program(ingress="udp && dst_port in @q"), sets={"p": [1]}),
        lambda: nft.attach(table, "unknown.service", temp_cgroup.path),
        lambda: nft.attach(table, unit, temp_cgroup.path + "-vanished"),
        lambda: nft.attach(table, unit, cgroup.cgroup2_mount()),
        lambda: nft.detach(table, unit, temp_cgroup.path + "-vanished"),
        lambda: nft.set_values(table, unit, [("param", "x", 5), ("param", "nope", 1)]),
        lambda: nft.set_values(table, unit, [("set", "p", "+", "81"), ("set", "p", "+", "70000x")]),
        lambda: nft.set_values(table, unit, [("mode", "audit"), ("set", "missing", "+", "1")]),
        lambda: nft.load("bad table", unit, program(ingress="udp")),
        lambda: nft.load(table, "bad/unit", program(ingress="udp")),
        lambda: nft.stats(table, "unknown.service"),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(NftError) as e:
            call()
        assert "\n" not in str(e.value), i
        assert snapshot(table) == before, f"bad input #{i} changed something: {e.value}"


def test_huge_ranges_stay_intervals(table):
    """nft sets hold intervals: a range of the whole u32 space is one element, never expanded
    (issue 8, item 7), and changes to it stay exact."""
    start = time.monotonic()
    nft.load(table, "t.service", program(ingress="udp && local_port in @p && len in @l"),
             sets={"p": [(0, 2**32 - 1)], "l": [(0, 2**32 - 1)]})
    assert nft.set_values(table, "t.service", [("set", "p", "-", "0..4294967295"), ("set", "p", "+", "53,1000..4294967295"),
                                                ("set", "l", "-", "100..4294967295")]) == \
        ["@p: removed 1", "@p: added 2", "@l: removed 1"]
    assert time.monotonic() - start < 5
    assert nft.stats(table, "t.service")["sets"] == {"p": ["53", "1000..4294967295"], "l": ["0..99"]}
    listing = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True).stdout
    assert "53, 1000-65535" in listing  # a port set holds what a port can be


def test_one_unit_per_cgroup(table, temp_cgroup):
    load_attached(table, temp_cgroup, ingress="udp")
    nft.load(table, "b.service", program(ingress="tcp", egress="tcp"))
    before = snapshot(table)
    with pytest.raises(NftError, match="already has unit t.service attached"):
        nft.attach(table, "b.service", temp_cgroup.path)
    assert snapshot(table) == before
    nft.load(table, "c.service", program(egress="tcp"))
    assert nft.attach(table, "c.service", temp_cgroup.path) == {"egress": True}  # other direction: fine


def test_nothing_outside_our_table_changes(table, temp_cgroup):
    other = f"bpfwall-test-other-{uuid.uuid4().hex[:6]}"
    subprocess.run(["nft", "add", "table", "inet", other], check=True)
    subprocess.run(["nft", "add", "chain", "inet", other, "c"], check=True)
    try:
        listing = lambda: subprocess.run(["nft", "-j", "list", "table", "inet", other],
                                         capture_output=True, text=True).stdout
        before = listing()
        unit = load_attached(table, temp_cgroup, ingress="udp", egress="udp")
        nft.set_values(table, unit, [("mode", "audit")])
        nft.restore(table)
        nft.unload(table, unit)
        assert listing() == before
    finally:
        subprocess.run(["nft", "delete", "table", "inet", other], check=True)


# -- the command line ---------------------------------------------------------------------

def test_cli_round_trip(table, temp_cgroup):
    env = dict(os.environ, BPFWALL_BACKEND="nft", BPFWALL_NFT_TABLE=table)
    run = lambda *a: subprocess.run([sys.executable, "-m", "bpfwall", *a], capture_output=True, text=True, env=env)
    r = run("load", "cli.service", "--ingress", "udp && local_port in @p", "--set", "p=53")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == f"  ingress: table inet {table} chain cli.service/in"
    assert run("attach", "cli.service", temp_cgroup.path).returncode == 0
    r = run("set", "cli.service", "@p+80", "mode=audit", "--json")
    assert json.loads(r.stdout)["done"] == ["@p: added 1", "mode = audit"]
    r = run("stats", "cli.service", "--json")
    s = json.loads(r.stdout)
    assert s["mode"] == "audit" and s["sets"] == {"p": ["53", "80"]}
    r = run("--backend", "bpf", "list")
    assert "cli.service" not in r.stdout  # the bpf backend has its own units
    r = run("list")
    assert r.stdout.splitlines()[0] == f"cli.service [audit] {temp_cgroup.path} (ingress)"
    r = run("explain", "tcp", "--direction", "ingress")
    assert "meta l4proto tcp" in r.stdout
    r = run("pin", "cli.service", "ingress", "/sys/fs/bpf/x")
    assert r.returncode == 2 and "only the bpf backend" in r.stderr
    r = run("unload", "cli.service")
    assert r.returncode == 0 and "detached from 1 attachment" in r.stdout


def test_cli_without_the_nftables_module_is_one_clear_line(table):
    """python3-nftables is not on PyPI: a venv without it gets the package's name, not a traceback."""
    env = dict(os.environ, BPFWALL_BACKEND="nft", BPFWALL_NFT_TABLE=table)
    code = ("import sys; sys.modules['nftables'] = None; from bpfwall.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "load", "a.service", "--ingress", "udp"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"bpfwall: error: {runner.MISSING_NFTABLES}\n"
    assert snapshot(table) == ("", None)  # no table, no state
