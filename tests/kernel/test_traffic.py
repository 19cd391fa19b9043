"""Real packets on loopback to and from sockets in a policed cgroup.

Sockets belong to the cgroup of the process that created them, so the test
process steps into its own test cgroup to create them (TempCgroup.socket).
Every test runs twice: with units clang builds, and with units bcc builds.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze
from tests.kernel.sockets import SO_RCVBUFFORCE, V4, V6, bound, ping, receive_all

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("no_leaks")]
COMPILER = {"name": "auto"}


@pytest.fixture(autouse=True, params=["clang", "bcc"])
def compiler(request, monkeypatch):
    """The compiler of this run's units: program() below, and bpfwall commands run here."""
    monkeypatch.setitem(COMPILER, "name", request.param)
    monkeypatch.setenv("BPFWALL_COMPILER", request.param)
    return request.param


def program(ingress=None, egress=None) -> UnitProgram:
    return UnitProgram(analyze(ingress) if ingress else None, analyze(egress) if egress else None,
                       compiler=COMPILER["name"])


def load_attached(pin_root, cg, unit="t.service", **exprs):
    bpf.load(pin_root, unit, program(**exprs))
    bpf.attach(pin_root, unit, cg.path)
    return unit


def counters(pin_root, unit):
    return bpf.stats(pin_root, unit)["counters"]


@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
def test_udp_ingress(pin_root, temp_cgroup, host, family):
    allowed, denied = bound(temp_cgroup, host, family), bound(temp_cgroup, host, family)
    with allowed, denied, socket.socket(family, socket.SOCK_DGRAM) as tx:
        pa, pd = allowed.getsockname()[1], denied.getsockname()[1]
        unit = load_attached(pin_root, temp_cgroup, ingress=f"udp && local_port == {pa}")
        payload = b"x" * 10
        for _ in range(20):
            tx.sendto(payload, (host, pa))
            tx.sendto(payload, (host, pd))
        assert receive_all(allowed) == 20
        assert receive_all(denied) == 0
        c = counters(pin_root, unit)["ingress"]
        header = 20 if family == socket.AF_INET else 40
        assert c["pass"] == {"packets": 20, "bytes": 20 * (header + 8 + len(payload))}
        assert c["drop"]["packets"] == 20


@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
def test_udp_egress(pin_root, temp_cgroup, host, family):
    rx_ok, rx_no = bound(None, host, family), bound(None, host, family)
    tx = temp_cgroup.socket(family, socket.SOCK_DGRAM)
    with rx_ok, rx_no, tx:
        pa, pd = rx_ok.getsockname()[1], rx_no.getsockname()[1]
        unit = load_attached(pin_root, temp_cgroup, egress=f"udp && remote_port == {pa}")
        refused = 0
        for _ in range(10):
            tx.sendto(b"a", (host, pa))
            try:
                tx.sendto(b"b", (host, pd))
            except PermissionError:  # a cgroup egress drop reports EPERM to the sender
                refused += 1
        assert receive_all(rx_ok) == 10
        assert receive_all(rx_no) == 0
        assert refused == 10
        c = counters(pin_root, unit)["egress"]
        assert c["pass"]["packets"] == 10 and c["drop"]["packets"] == 10


@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
def test_tcp_ingress(pin_root, temp_cgroup, host, family):
    ok_l, no_l = bound(temp_cgroup, host, family, socket.SOCK_STREAM), bound(temp_cgroup, host, family, socket.SOCK_STREAM)
    with ok_l, no_l:
        ok_l.listen(4)
        no_l.listen(4)
        pa, pd = ok_l.getsockname()[1], no_l.getsockname()[1]
        unit = load_attached(pin_root, temp_cgroup, ingress=f"tcp && local_port == {pa}")
        with socket.create_connection((host, pa), timeout=2) as c:
            conn, _ = ok_l.accept()
            with conn:
                c.sendall(b"hello")
                assert conn.recv(10) == b"hello"
        with pytest.raises(OSError):
            socket.create_connection((host, pd), timeout=0.5).close()
        c = counters(pin_root, unit)["ingress"]
        assert c["pass"]["packets"] >= 3 and c["drop"]["packets"] >= 1


def test_icmp_both_directions(pin_root, temp_cgroup):
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        unit = load_attached(pin_root, temp_cgroup, ingress="icmp && icmp_type == 0",
                             egress="icmp && icmp_type == 8 && icmp_code == 0")
        assert ping(s) == 3
        bpf.load(pin_root, unit, program(ingress="icmp && icmp_type == 8", egress="icmp"))
        assert ping(s) == 0  # replies dropped on ingress
        bpf.load(pin_root, unit, program(ingress="icmp", egress="!icmp"))
        assert ping(s) == 0  # requests dropped on egress
        c = counters(pin_root, unit)
        assert c["egress"]["drop"]["packets"] >= 3 and c["ingress"]["drop"]["packets"] >= 3


def test_reload_under_steady_traffic_loses_nothing(pin_root, temp_cgroup):
    """Swapping the program (BPF_F_REPLACE) while packets flow drops none that both versions allow."""
    rx = temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    exprs = [f"udp && local_port == {port}", f"udp && local_port in {{9, {port}, 10..20}}",
             f"(udp || tcp) && local_port >= {port} && local_port <= {port}"]
    unit = load_attached(pin_root, temp_cgroup, ingress=exprs[0])
    for e in exprs:  # compile each once up front: reloads below hit the cache
        bpf.load(pin_root, unit, program(ingress=e))
    total, received = 20000, [0]
    done = threading.Event()

    def receiver():
        rx.settimeout(0.5)
        while True:
            try:
                rx.recv(64)
                received[0] += 1
            except (TimeoutError, socket.timeout):
                if done.is_set():
                    return

    t = threading.Thread(target=receiver)
    t.start()
    reloads = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for i in range(total):
            tx.sendto(b"p", ("127.0.0.1", port))
            if i % 1000 == 500:
                result = bpf.load(pin_root, unit, program(ingress=exprs[reloads % len(exprs)]))
                assert result.replaced == [(temp_cgroup.path, "ingress")]
                reloads += 1
            if i % 200 == 0:
                time.sleep(0.001)  # a steady rate, well inside the receive buffer
    done.set()
    t.join()
    rx.close()
    assert reloads == 20
    assert received[0] == total
    c = counters(pin_root, unit)["ingress"]
    assert c["pass"]["packets"] == total and c["drop"]["packets"] == 0


def test_removed_cgroup_is_no_error(pin_root):
    from bpfwall.sandbox import TempCgroup

    with TempCgroup("bpfwall-test") as cg:
        unit = load_attached(pin_root, cg, ingress="udp")
    # The cgroup is gone: stats and unload still work and find no attachment.
    assert bpf.stats(pin_root, unit)["attached"] == []
    bpf.unload(pin_root, unit)
    assert not os.path.exists(bpf.unit_dir(pin_root, unit))


def test_audit_mode_passes_and_counts(pin_root, temp_cgroup):
    """Audit: everything arrives; what the filter would drop is counted as dropped."""
    rx = bound(temp_cgroup, *V4)
    with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        port = rx.getsockname()[1]
        unit = "audit.service"
        bpf.load(pin_root, unit, program(ingress="tcp"), mode="audit")
        bpf.attach(pin_root, unit, temp_cgroup.path)
        for _ in range(7):
            tx.sendto(b"x", ("127.0.0.1", port))
        assert receive_all(rx) == 7
        assert counters(pin_root, unit)["ingress"]["drop"]["packets"] == 7
        with bpf.PinnedUnit.open(pin_root, unit) as u:  # back to enforce, live
            u.write_mode("enforce")
        for _ in range(3):
            tx.sendto(b"x", ("127.0.0.1", port))
        assert receive_all(rx) == 0
        assert counters(pin_root, unit)["ingress"]["drop"]["packets"] == 10


def _icmp6_echo(seq: int) -> bytes:
    return struct.pack("!BBHHH", 128, 0, 0, 0x4242, seq) + b"bpfwall!"  # the kernel fills the checksum


def test_icmpv6(pin_root, temp_cgroup):
    with temp_cgroup.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
        unit = load_attached(pin_root, temp_cgroup, ingress="icmp && icmp_type == 129",
                             egress="ipv6 && icmp && icmp_type == 128")

        def ping6() -> int:
            for seq in range(3):
                try:
                    s.sendto(_icmp6_echo(seq), ("::1", 0))
                except PermissionError:
                    pass
            s.settimeout(0.3)
            replies = 0
            try:
                while True:
                    if s.recv(2048)[0] == 129:  # raw ICMPv6 sockets get no IP header
                        replies += 1
            except (TimeoutError, socket.timeout):
                return replies

        assert ping6() == 3
        bpf.load(pin_root, unit, program(ingress="icmp && icmp_type == 128", egress="icmp"))
        assert ping6() == 0


def test_concurrent_loads_attach_once(pin_root, temp_cgroup):
    """Four `bpfwall load`s of one unit at once: each swaps in place, none attaches a second copy."""
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "bpfwall")
    env = dict(os.environ, BPFWALL_PIN_ROOT=pin_root)
    unit = load_attached(pin_root, temp_cgroup, ingress="udp")
    assert bpf.stats(pin_root, unit)["compiler"] == COMPILER["name"]
    procs = [subprocess.Popen([exe, "load", unit, "--ingress", f"udp && dst_port != {i}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    from bpfwall.kernel import cgroup

    flags, ids = cgroup.query(temp_cgroup.path, "ingress")
    assert len(ids) == 1
    assert bpf.stats(pin_root, unit)["programs"]["ingress"] == ids[0]
    assert bpf.stats(pin_root, unit)["compiler"] == COMPILER["name"]  # the loads' $BPFWALL_COMPILER


def test_tcp_bulk_transfer_with_gso(pin_root, temp_cgroup):
    """8 MiB through filters on both directions: large skbs (loopback's 64 KiB MTU, GSO) pass like
    small ones, with their payload in page fragments beyond the linear area; none is dropped."""
    server = bound(temp_cgroup, *V4, kind=socket.SOCK_STREAM)
    with server:
        server.listen(1)
        port = server.getsockname()[1]
        unit = load_attached(pin_root, temp_cgroup, ingress=f"tcp && local_port == {port}",
                             egress=f"tcp && local_port == {port}")
        size, got = 8 << 20, [0]

        def sink():
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    got[0] += len(chunk)

        t = threading.Thread(target=sink)
        t.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(b"\xab" * size)
        t.join(timeout=30)
        assert got[0] == size
        c = counters(pin_root, unit)
        assert c["ingress"]["drop"]["packets"] == 0 and c["egress"]["drop"]["packets"] == 0
        assert c["ingress"]["pass"]["bytes"] >= size
        # Fewer packets than 1500-byte segments would need: the filter saw large skbs.
        assert c["ingress"]["pass"]["packets"] < size // 1448
