"""`ifname` on real packets: which device cgroup_skb sees each way, and devices that appear and
are renamed after the unit is loaded.

The thread runs in a namespace of its own (A) with a veth whose peer is in a second one (B):
packets to B's address leave A by the veth, packets from B arrive by it; packets to A's own
addresses go by A's loopback. Measured here, and relied on by lower/c.py: `__sk_buff->ifindex`
is the device a packet arrives on at ingress and the one it leaves by at egress.
"""
from __future__ import annotations

import select
import socket
import subprocess
import uuid

import pytest

from bpfwall.backends import bpf
from bpfwall.backends.bpf_interfaces import InterfaceGuard
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze
from tests.kernel.realpackets import NetNamespace
from tests.kernel.sockets import receive_all

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("no_leaks")]

A_ADDR, B_ADDR = "10.77.0.1", "10.77.0.2"


class Log:
    def __init__(self):
        self.lines = []

    def _say(self, action, message, **kw):
        self.lines.append((action, message))

    debug = info = warning = error = _say


@pytest.fixture
def world():
    """(namespace A, entered; namespace B) with lo up in both and nothing else yet."""
    with NetNamespace() as a:
        b = NetNamespace().create()
        try:
            yield a, b
        finally:
            b.remove()


def veth(a: NetNamespace, b: NetNamespace, name: str) -> None:
    """A veth `name` in A (A_ADDR) whose peer is in B (B_ADDR)."""
    peer = f"p{uuid.uuid4().hex[:8]}"
    run = ["ip", "link", "add", name, "type", "veth", "peer", "name", peer, "netns", b.name]
    subprocess.run(run, check=True, capture_output=True)
    subprocess.run(["ip", "addr", "add", f"{A_ADDR}/24", "dev", name], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    subprocess.run(["ip", "-n", b.name, "addr", "add", f"{B_ADDR}/24", "dev", peer], check=True)
    subprocess.run(["ip", "-n", b.name, "link", "set", peer, "up"], check=True)


def rename(old: str, new: str) -> None:
    for args in (["set", old, "down"], ["set", old, "name", new], ["set", new, "up"]):
        subprocess.run(["ip", "link", *args], check=True)


def load(pin_root, cg, **exprs) -> str:
    unit = "ifname.service"
    bpf.load(pin_root, unit, UnitProgram(*(analyze(exprs[d]) if d in exprs else None for d in ("ingress", "egress"))))
    bpf.attach(pin_root, unit, cg.path)
    return unit


def sent(tx, host: str, rx, count: int = 5) -> int:
    """Datagrams from `tx` to `rx` (bound at `host`) that arrived; a dropped one is EPERM at egress."""
    for _ in range(count):
        try:
            tx.sendto(b"x", (host, rx.getsockname()[1]))
        except PermissionError:
            pass
    return receive_all(rx)


def receiver(ns: NetNamespace | None, host: str, cg=None):
    if ns is not None:
        with ns.entered():
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        s = cg.socket(socket.AF_INET, socket.SOCK_DGRAM) if cg else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s


def test_egress_is_the_device_a_packet_leaves_by(world, pin_root, temp_cgroup):
    a, b = world
    veth(a, b, "wt0")
    load(pin_root, temp_cgroup, egress='ifname == "wt0"')
    with temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx, \
            receiver(b, B_ADDR) as by_veth, receiver(None, "127.0.0.1") as by_lo:
        assert sent(tx, B_ADDR, by_veth) == 5
        assert sent(tx, "127.0.0.1", by_lo) == 0


def test_ingress_is_the_device_a_packet_arrives_on(world, pin_root, temp_cgroup):
    a, b = world
    veth(a, b, "wt0")
    load(pin_root, temp_cgroup, ingress='ifname in {"lo"}')
    with receiver(None, A_ADDR, temp_cgroup) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as local:
        with b.entered():
            remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with remote:
            assert sent(local, A_ADDR, rx) == 5   # A to its own address: by loopback
            assert sent(remote, A_ADDR, rx) == 0  # from B: arrives on wt0


def test_a_device_made_after_loading_and_renamed_is_judged_by_its_name_now(world, pin_root, temp_cgroup):
    a, b = world
    log = Log()
    guard = InterfaceGuard(pin_root, log)  # the watcher's: it follows rtnetlink from now on
    try:
        unit = load(pin_root, temp_cgroup, egress='ifname in {"lo", "good*"}')
        veth(a, b, "bad0")  # appears after the load
        _settle(guard)
        with temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx, receiver(b, B_ADDR) as rx:
            assert sent(tx, B_ADDR, rx) == 0
            rename("bad0", "good0")
            _settle(guard)  # the link message wakes the guard; it rewrites the unit's map
            assert sent(tx, B_ADDR, rx) == 5
            rename("good0", "bad1")
            _settle(guard)
            assert sent(tx, B_ADDR, rx) == 0
            # Without a watcher: `bpfwall set UNIT interfaces` looks the names up again.
            rename("bad1", "good1")
            assert bpf.set_values(pin_root, unit, [("interfaces",)])[-1] == \
                "interfaces: 2 device(s) match good*, lo"
            assert sent(tx, B_ADDR, rx) == 5
            subprocess.run(["ip", "link", "del", "good1"], check=True)
            _settle(guard)
            assert bpf.stats(pin_root, unit)["counters"]["egress"]["drop"]["packets"] == 10
    finally:
        guard.close()


def test_the_watcher_follows_devices_made_and_renamed_after_it_started(world, daemon, policy_dir, subtree):
    """`bpfwall watch` itself (in namespace A): its guard rewrites the unit's map on the link messages."""
    from tests.kernel.watcher import inside, mkcg, wait_for, write_policy

    a, b = world
    write_policy(policy_dir, '[units."x.service"]\negress = \'ifname in {"lo", "good*"}\'\n')
    cg = mkcg(subtree, "x.service")
    daemon.start()
    veth(a, b, "bad0")  # after the watcher loaded the unit
    with inside(cg):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tx, receiver(b, B_ADDR) as rx:
        assert sent(tx, B_ADDR, rx) == 0
        rename("bad0", "good0")
        wait_for("the watcher to match good0", lambda: sent(tx, B_ADDR, rx, 1) == 1)
        rename("good0", "bad1")
        wait_for("the watcher to unmatch bad1", lambda: sent(tx, B_ADDR, rx, 1) == 0)


@pytest.fixture(params=["bpf", "nft"])
def backend(request, world, pin_root, tmp_path, monkeypatch):
    """(name, load(unit, program) → None, unload()) of either backend, in namespace A."""
    from bpfwall.backends import nft
    from bpfwall.nft import runner as nft_runner

    if request.param == "bpf":
        yield "bpf", lambda unit, program, cg: (bpf.load(pin_root, unit, program), bpf.attach(pin_root, unit, cg))
        return
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft-state"))
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    nft_runner.reset()  # the nft worker runs in this namespace: its rules are the namespace's
    try:
        yield "nft", lambda unit, program, cg: (nft.load(table, unit, program), nft.attach(table, unit, cg))
    finally:
        nft.destroy(table)
        nft_runner.reset()


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_both_backends_judge_the_device_alike(world, backend, temp_cgroup, direction):
    """nft matches iifname/oifname itself (a trailing '*' as its prefix match), bpf through the
    ifaces map: the same expression passes the same packets."""
    a, b = world
    veth(a, b, "wt0")
    name, load = backend
    expr = 'ifname in {"wt*"} && udp'
    load("parity.service", UnitProgram(*(analyze(expr) if d == direction else None for d in ("ingress", "egress"))),
         temp_cgroup.path)
    if direction == "egress":
        with temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx, \
                receiver(b, B_ADDR) as by_veth, receiver(None, "127.0.0.1") as by_lo:
            assert (sent(tx, B_ADDR, by_veth), sent(tx, "127.0.0.1", by_lo)) == (5, 0), name
    else:
        with receiver(None, A_ADDR, temp_cgroup) as rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as local:
            with b.entered():
                remote = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with remote:
                assert (sent(remote, A_ADDR, rx), sent(local, A_ADDR, rx)) == (5, 0), name


def _settle(guard: InterfaceGuard) -> None:
    """Wait for the guard's fd as the watcher's poll loop does, and let it act on what it read."""
    while select.select([guard.fd], [], [], 0.5)[0]:
        guard.readable()


def test_bpfwall_test_takes_the_device(world, capsys):
    """`bpfwall test --ifname D` runs the packets as if they came by D (one of the namespace's)."""
    from tests.kernel.invoke import run

    a, b = world
    veth(a, b, "eth7")
    udp = "4500001c00000000401100000a0000010a0000029c40003500080000"
    expr = 'ifname in {"eth*"}'
    assert run(capsys, "test", expr, "--hex", udp)[:2] == (0, "drop\n")  # lo by default
    assert run(capsys, "test", expr, "--ifname", "eth7", "--hex", udp)[:2] == (0, "pass\n")
    code, _, err = run(capsys, "test", expr, "--ifname", "wg9", "--hex", udp)
    assert code == 2 and err.startswith("bpfwall: error: no device 'wg9' here (devices: ")
