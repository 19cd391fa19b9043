"""The nft backend's drop events: `log group` + `limit` rules on the drop path, read back over
nfnetlink_log as DropEvents (NftBackend.events), with real nft rules and real packets in a
network namespace of the module's own (nflog groups and nft rules belong to it)."""
from __future__ import annotations

import random
import socket
import subprocess
import time

import pytest

from bpfwall.backends import nft
from bpfwall.backends.nft_backend import NftBackend
from bpfwall.backends.nft_events import UNATTRIBUTED
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze_pair
from bpfwall.nft.errors import NftError
from bpfwall.nft.state import StateFile
from tests.kernel.sockets import V4, V6

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("events_state_dir")]

UNIT = "ev.service"
DENIED, ALLOWED = 4001, 4000
EXPR = {"ingress": f"!(udp && local_port == {DENIED})", "egress": f"!(udp && remote_port == {DENIED})"}


@pytest.fixture(scope="module")
def world(nft_world):
    return nft_world


@pytest.fixture
def table(world, table):
    """The conftest's table, made in the module's namespace; deleted after."""
    try:
        yield table
    finally:
        nft.destroy(table)


def group() -> int:
    return random.randint(3000, 60000)  # nothing else binds groups in our namespace; vary anyway


def load(table, cg, direction, mode="enforce", log_rate=None, log_burst=None, log_group=None):
    program = UnitProgram(*analyze_pair(EXPR["ingress"] if direction == "ingress" else None,
                                        EXPR["egress"] if direction == "egress" else None))
    nft.load(table, UNIT, program, mode=mode, log_rate=log_rate, log_burst=log_burst, log_group=log_group)
    nft.attach(table, UNIT, cg.path)


class Flow:
    """Datagrams between a policed socket (in the cgroup) and an unpoliced one: the policed one
    receives (ingress) or sends (egress). Ports are fixed: the namespace is ours alone."""

    def __init__(self, cg, host, family, direction):
        self.host, self.family, self.direction = host, family, direction
        rx_cg = cg if direction == "ingress" else None
        self.rx = {p: self._socket(rx_cg, family) for p in (ALLOWED, DENIED)}
        for p, s in self.rx.items():
            s.bind((host, p))
            s.setblocking(False)
        self.tx = self._socket(cg if direction == "egress" else None, family)
        self.tx.bind((host, 0))
        self.refused = 0

    @staticmethod
    def _socket(cg, family):
        return cg.socket(family, socket.SOCK_DGRAM) if cg is not None else socket.socket(family, socket.SOCK_DGRAM)

    def send(self, port: int, count: int, size: int = 10) -> None:
        data = b"x" * size
        for _ in range(count):
            try:
                self.tx.sendto(data, (self.host, port))
            except PermissionError:  # an nft drop on output: EPERM to the sender
                self.refused += 1

    def received(self, port: int) -> int:
        n = 0
        while True:
            try:
                self.rx[port].recv(65536)
                n += 1
            except BlockingIOError:
                return n

    def close(self):
        for s in (*self.rx.values(), self.tx):
            s.close()


def drain(source, settle: float = 0.5) -> list:
    """Every event until none arrives for `settle` seconds."""
    got = []
    while batch := source.read(timeout=settle):
        got += batch
    return got


def drops(table, direction) -> int:
    return nft.stats(table, UNIT)["counters"][direction]["drop"]["packets"]


@pytest.mark.parametrize("mode", ["enforce", "audit"])
@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_events_are_exactly_the_dropped_packets(world, table, direction, host, family, mode):
    _, cg = world
    load(table, cg, direction, mode, log_rate=1000, log_burst=100, log_group=group())
    state = StateFile(table).load()
    assert nft.healthy(table, state, deep=True)  # the guard's rule counts match the rendering
    flow = Flow(cg, host, family, direction)
    try:
        with NftBackend(table).events() as source:
            flow.send(ALLOWED, 4)
            flow.send(DENIED, 5, size=33)
            got = drain(source)
            delivered = flow.received(DENIED)
            lost = source.lost()
        sport = flow.tx.getsockname()[1]
    finally:
        flow.close()
    assert delivered == (5 if mode == "audit" else 0)
    assert drops(table, direction) == 5 == len(got)
    assert lost == {(UNIT, direction): 0}
    header = 20 if family == socket.AF_INET else 40
    for e in got:
        assert (e.unit, e.direction, e.verdict) == (UNIT, direction, "drop" if mode == "enforce" else "audit")
        assert (e.family, e.proto, e.proto_name) == (4 if family == socket.AF_INET else 6, 17, "udp")
        assert (e.saddr, e.daddr, e.sport, e.dport) == (host, host, sport, DENIED)
        assert (e.icmp_type, e.icmp_code, e.length, e.cgroup_id) == (None, None, header + 8 + 33, 0)
        assert abs(e.time - time.time()) < 30
    assert nft.stats(table, UNIT)["events"]["lost"] == {"ingress": 0, "egress": 0}


def test_the_rate_limit_holds_and_the_rest_is_counted_lost(world, table):
    _, cg = world
    rate, burst, flood = 200, 20, 20000
    load(table, cg, "egress", log_rate=rate, log_burst=burst, log_group=group())
    flow = Flow(cg, *V4, "egress")
    try:
        with NftBackend(table).events([UNIT]) as source:
            start = time.monotonic()
            flow.send(DENIED, flood)
            took = time.monotonic() - start
            got = drain(source)
            lost = source.lost()
    finally:
        flow.close()
    assert flow.refused == flood == drops(table, "egress")
    assert 0 < len(got) <= burst + rate * took, (len(got), took)
    assert lost[(UNIT, "egress")] + len(got) == flood
    assert sum(lost.values()) == lost[(UNIT, "egress")]  # nothing lost to a full socket buffer
    assert nft.stats(table, UNIT)["events"] == {"log_rate": rate, "log_burst": burst, "log_group": state_group(table),
                                                "lost": {"ingress": 0, "egress": flood - len(got)}}


def state_group(table) -> int:
    return StateFile(table).load().log_group


def listing(table) -> str:
    return subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True, check=True).stdout


def test_log_rate_0_logs_nothing_and_set_changes_it_live(world, table):
    _, cg = world
    load(table, cg, "egress", log_rate=0, log_group=group())
    assert " log " not in listing(table) and "limit" not in listing(table)
    assert nft.healthy(table, StateFile(table).load(), deep=True)
    flow = Flow(cg, *V4, "egress")
    try:
        with NftBackend(table).events() as source:
            flow.send(DENIED, 50)
            assert drain(source, 0.3) == [] and source.lost() == {(UNIT, "egress"): 0}

            assert nft.set_values(table, UNIT, [("log_rate", 5), ("log_burst", 3)]) == ["log_rate = 5",
                                                                                         "log_burst = 3"]
            assert "limit rate over 5/second burst 3 packets" in listing(table)
            assert nft.healthy(table, StateFile(table).load(), deep=True)
            start = time.monotonic()
            flow.send(DENIED, 50)
            took = time.monotonic() - start
            got = drain(source, 0.3)
            assert 3 <= len(got) <= 3 + 5 * took
            assert len(got) + source.lost()[(UNIT, "egress")] == 50

            nft.set_values(table, UNIT, [("log_rate", 0)])
            assert " log " not in listing(table)
            flow.send(DENIED, 50)
            assert drain(source, 0.3) == []
    finally:
        flow.close()
    assert drops(table, "egress") == 150 == flow.refused


def test_a_bad_setting_changes_nothing(world, table):
    _, cg = world
    load(table, cg, "egress", log_rate=7, log_group=group())
    before = (listing(table), StateFile(table).load().as_json())
    for change in (("log_rate", -1), ("log_burst", 0), ("log_rate", "5"), ("log_rate", 10**7)):
        with pytest.raises(NftError, match=change[0]):
            nft.set_values(table, UNIT, [change])
    with pytest.raises(NftError, match="log-group"):
        nft.load(table, UNIT, UnitProgram(*analyze_pair(None, EXPR["egress"])), log_group=70000)
    assert (listing(table), StateFile(table).load().as_json()) == before


def test_a_unit_loaded_after_the_source_opened_is_reported(world, table):
    _, cg = world
    g = group()
    load(table, cg, "egress", log_rate=0, log_group=g)  # the table exists: its group is g
    with NftBackend(table).events() as source:
        nft.load(table, "late.service", UnitProgram(*analyze_pair(None, EXPR["egress"])))
        nft.detach(table, UNIT, cg.path)
        nft.attach(table, "late.service", cg.path)
        flow = Flow(cg, *V6, "egress")
        try:
            flow.send(DENIED, 3)
        finally:
            flow.close()
        got = drain(source)
    assert [(e.unit, e.direction, e.dport) for e in got] == [("late.service", "egress", DENIED)] * 3


def test_a_new_log_group_moves_every_unit(world, table):
    _, cg = world
    load(table, cg, "egress", log_rate=10, log_group=group())
    g = group()
    nft.load(table, "other.service", UnitProgram(*analyze_pair(None, EXPR["egress"])), log_group=g)
    assert listing(table).count(f"group {g}") == 2  # both units' log rules
    with NftBackend(table).events([UNIT]) as source:
        assert source.group == g
        flow = Flow(cg, *V4, "egress")
        try:
            flow.send(DENIED, 2)
        finally:
            flow.close()
        assert [e.unit for e in drain(source)] == [UNIT] * 2


def test_the_cli_sets_events_and_refuses_bad_values(world, table, capsys):
    """load --log-rate/--log-burst, --log-group, set log_rate=…, stats --json: the events key."""
    import json

    from tests.kernel.invoke import ok, run

    g = group()
    nft_args = ["--backend", "nft", "--table", table]
    ok(capsys, *nft_args, "--log-group", str(g), "load", UNIT, "--egress", EXPR["egress"],
       "--log-rate", "7", "--log-burst", "9")
    events = json.loads(ok(capsys, *nft_args, "stats", UNIT, "--json"))["events"]
    assert events == {"log_rate": 7, "log_burst": 9, "log_group": g, "lost": {"ingress": 0, "egress": 0}}
    assert "limit rate over 7/second burst 9 packets" in listing(table) and f"group {g}" in listing(table)
    ok(capsys, *nft_args, "set", UNIT, "log_rate=0")
    assert json.loads(ok(capsys, *nft_args, "stats", UNIT, "--json"))["events"]["log_rate"] == 0
    assert " log " not in listing(table)
    before = listing(table)
    for bad in (["set", UNIT, "log_rate=-3"], ["set", UNIT, "log_burst=x"], ["--log-group", "70000", "stats", UNIT]):
        code, _, err = run(capsys, *nft_args, *bad)
        assert code == 2 and len(err.splitlines()) == 1 and ("log_" in err or "log-group" in err), err
    assert listing(table) == before


def drain_all(*sources, settle: float = 0.5) -> list[list]:
    """Every event each source reads until none has come for `settle` seconds; round robin, as
    readers in separate processes run side by side (the group's owner forwards while it runs)."""
    out = [[] for _ in sources]
    last = time.monotonic()
    while time.monotonic() - last < settle:
        for i, s in enumerate(sources):
            if batch := s.read(timeout=0.01):
                out[i] += batch
                last = time.monotonic()
    return out


def test_two_readers_of_a_group_each_see_every_drop(world, table):
    """A group has one listener: the first reader binds it, the second gets every event from it."""
    _, cg = world
    load(table, cg, "egress", log_rate=1000, log_burst=100, log_group=group())
    flow = Flow(cg, *V4, "egress")
    try:
        with NftBackend(table).events() as first, NftBackend(table).events([UNIT]) as second:
            assert (first.channel.owner, second.channel.owner) == (True, False)
            for size in range(30):
                flow.send(DENIED, 1, size=size)
            got = drain_all(first, second)
            lost = (first.lost(), second.lost())
        sport = flow.tx.getsockname()[1]
    finally:
        flow.close()
    expected = [("egress", "drop", "127.0.0.1", sport, DENIED, 28 + size) for size in range(30)]
    for events in got:
        assert [(e.direction, e.verdict, e.daddr, e.sport, e.dport, e.length) for e in events] == expected
    assert lost == ({(UNIT, "egress"): 0}, {(UNIT, "egress"): 0})


def test_messages_a_full_socket_buffer_dropped_are_counted_exactly(world, table, monkeypatch):
    """ENOBUFS says only that something was lost; the sequence numbers say how much."""
    from bpfwall.nft import nflog

    _, cg = world
    flood = 3000
    load(table, cg, "egress", log_rate=1_000_000, log_burst=1_000_000, log_group=group())
    plain = nflog.NflogReader.__init__
    monkeypatch.setattr(nflog.NflogReader, "__init__", lambda self, g: plain(self, g, rcvbuf=4096))
    flow = Flow(cg, *V4, "egress")
    try:
        with NftBackend(table).events([UNIT]) as source:
            flow.send(DENIED, flood)  # nobody reads meanwhile: a 4 KiB buffer holds a few messages
            got = drain(source)
            flow.send(DENIED, 1)  # one more, into an empty buffer: the gap before it shows
            got += drain(source)
            lost = source.lost()
    finally:
        flow.close()
    assert drops(table, "egress") == flood + 1
    assert lost[UNATTRIBUTED] > 0 and lost[(UNIT, "egress")] == 0  # the limit never bit
    assert len(got) + lost[UNATTRIBUTED] == flood + 1


def test_monitor_reads_both_backends_at_once(world, table, pin_root):
    """No --backend: one monitor shows an nft unit's drops (real packets) and a bpf unit's (test
    runs of its pinned program) as they come."""
    import json
    import os
    import struct

    from bpfwall.backends import bpf
    from bpfwall.kernel import progs
    from tests.kernel.invoke import PYTHON, REPO

    _, cg = world
    load(table, cg, "egress", log_rate=1000, log_burst=100, log_group=group())
    bpf.load(pin_root, "bpfev.service", UnitProgram(*analyze_pair("tcp", None)))
    env = {k: v for k, v in os.environ.items() if k != "BPFWALL_BACKEND"}
    mon = subprocess.Popen([PYTHON, "-m", "bpfwall", "monitor", "--json", "--table", table], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env={**env, "BPFWALL_PIN_ROOT": pin_root})
    flow = Flow(cg, *V4, "egress")
    lines = []
    try:
        os.set_blocking(mon.stdout.fileno(), False)

        def seen(n):
            lines.extend(json.loads(line) for line in mon.stdout.readlines())
            return len(lines) >= n

        deadline = time.monotonic() + 30
        while not seen(1) and time.monotonic() < deadline:  # nft events flow once monitor has the group
            flow.send(DENIED, 1, size=99)
            time.sleep(0.05)
        udp = (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes([192, 0, 2, 1]),
                           bytes([192, 0, 2, 2])) + struct.pack("!HHHH", 1234, 53, 8, 0))
        with bpf.PinnedUnit.open(pin_root, "bpfev.service") as u:
            progs.prog_test_run(u.progs["ingress"], b"\0" * 12 + b"\x08\x00" + udp, 2)
        flow.send(DENIED, 3, size=10)
        probes = len(lines)
        while not seen(probes + 5) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        flow.close()
        mon.terminate()
        mon.communicate(timeout=30)
    got = sorted((e["unit"], e["direction"], e["dport"], e["length"]) for e in lines if e["length"] != 127)
    assert got == [("bpfev.service", "ingress", 53, 28)] * 2 + [(UNIT, "egress", DENIED, 38)] * 3
    assert mon.returncode == 0
