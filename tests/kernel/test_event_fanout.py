"""Every reader of a unit's drop events sees every event (bpfwall/fanout.py), real parts: two
`bpfwall monitor`s and the watcher beside each other on a real flow; readers of BPF_PROG_TEST_RUN
floods that leave, stall or are not root."""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import struct
import subprocess
import time

import pytest

from bpfwall import fanout
from bpfwall.backends import bpf
from bpfwall.backends.bpf_events import BpfEvents
from bpfwall.build import UnitProgram
from bpfwall.kernel import cgroup, progs
from bpfwall.lang.checker import analyze
from tests.kernel.invoke import PYTHON, REPO
from tests.kernel.watcher import attached_id, inside, mkcg, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks", "events_state_dir")]

UNIT = "fan.service"
UDP = (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
       + struct.pack("!HHHH", 1234, 53, 8, 0))


def read_all(*sources, quiet=0.5) -> list[list]:
    """What each source reads until none has read anything for `quiet` seconds; round robin, as
    separate processes would run side by side (an owner sends only while it runs)."""
    out = [[] for _ in sources]
    last = time.monotonic()
    while time.monotonic() - last < quiet:
        for i, s in enumerate(sources):
            if batch := s.read(0.01):
                out[i] += batch
                last = time.monotonic()
    return out


class Lines:
    """A monitor's stdout, read line by line as it comes."""

    def __init__(self, proc):
        self.proc, self.lines, self._buf = proc, [], b""
        os.set_blocking(proc.stdout.fileno(), False)

    def poll(self) -> list[str]:
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20) or b""
        except BlockingIOError:
            chunk = b""
        *done, self._buf = (self._buf + chunk).split(b"\n")
        self.lines += [d.decode() for d in done]
        return self.lines


def test_two_monitors_and_the_watcher_each_see_every_drop(daemon, policy_dir, pin_root, subtree):
    write_policy(policy_dir, unit("a.service", ingress="tcp", extra="log_rate = 1000\nlog_burst = 1000"))
    a = mkcg(subtree, "a.service")
    plain = daemon.args
    daemon.args = lambda *extra: plain(*extra, "--drop-events", "1000")  # forwards every event
    daemon.start()
    wait_for("a.service attached", lambda: attached_id(pin_root, a) is not None)
    env = {**os.environ, "BPFWALL_STATE_DIR": str(daemon.state_dir), "BPFWALL_PIN_ROOT": pin_root}
    monitors = [subprocess.Popen([PYTHON, "-m", "bpfwall", "monitor", "a.service", "--json"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, cwd=REPO, env=env) for _ in range(2)]
    outs = [Lines(m) for m in monitors]
    logged = re.compile(r"\d\d:\d\d:\d\d\.\d{3} a\.service ingress DROP udp 127\.0\.0\.1:(\d+) → 127\.0\.0\.1:(\d+) "
                        r"len (\d+)")
    try:
        with inside(a):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind(("127.0.0.1", 0))
            port = rx.getsockname()[1]
            # Probes until each reader shows one: it reads (a subscriber: the owner has taken it in).
            def up():
                tx.sendto(b"p" * 100, ("127.0.0.1", port))
                time.sleep(0.05)
                return all(o.poll() for o in outs) and logged.search(daemon.log())
            wait_for("every reader up", up)
            sport = tx.getsockname()[1]
            for i in range(40):  # the flow: 40 datagrams of 40 lengths, all dropped
                tx.sendto(b"x" * i, ("127.0.0.1", port))
            expected = [(sport, port, 28 + i) for i in range(40)]
            def flow_seen(lines):
                return sum(1 for line in lines if " len 128" not in line and '"length": 128' not in line) >= 40
            wait_for("the flow, everywhere", lambda: all(flow_seen(o.poll()) for o in outs) and
                     flow_seen([m.group(0) for m in logged.finditer(daemon.log())]))
            time.sleep(0.3)  # and nothing more
        probe = (sport, port, 128)
        watcher = [tuple(map(int, m.groups())) for m in logged.finditer(daemon.log())]
        seen = {"watcher": [e[2] for e in watcher if e != probe]}  # lengths, to say what differs
        for i, o in enumerate(outs):
            seen[f"monitor {i}"] = [json.loads(line)["length"] for line in o.poll()]
        assert [e for e in watcher if e != probe] == expected, seen
        for o in outs:
            events = [json.loads(line) for line in o.poll()]
            assert [(e["sport"], e["dport"], e["length"]) for e in events if e["length"] != 128] == expected, seen
            assert {(e["unit"], e["direction"], e["verdict"], e["proto"], e["saddr"], e["daddr"], e["cgroup_id"])
                    for e in events} == {("a.service", "ingress", "drop", "udp", "127.0.0.1", "127.0.0.1",
                                          cgroup.cgroup_id(a))}
        assert bpf.stats(pin_root, "a.service")["events"]["lost"] == {"ingress": 0, "egress": 0}
    finally:
        for m in monitors:
            m.terminate()
            m.communicate(timeout=30)
    assert [m.returncode for m in monitors] == [0, 0]


@pytest.fixture
def ring_unit(pin_root):
    bpf.load(pin_root, UNIT, UnitProgram(analyze("tcp"), None), log={"log_rate": 1_000_000, "log_burst": 1_000_000})
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        fd = u.progs["ingress"]
        yield lambda n: progs.prog_test_run(fd, b"\0" * 12 + b"\x08\x00" + UDP, n)


def test_when_the_owner_leaves_a_subscriber_takes_over_and_none_misses_a_record(pin_root, ring_unit,
                                                                               events_state_dir):
    readers = [BpfEvents(pin_root, [UNIT]) for _ in range(3)]
    try:
        assert [r._rings[UNIT].channel.owner for r in readers] == [True, False, False]
        assert [p.name for p in events_state_dir.joinpath("events").iterdir() if p.name.endswith(".sock")] == \
            [f"ring-{readers[0]._rings[UNIT].map_id}.sock"]
        got = [0, 0, 0]
        for _ in range(10):
            ring_unit(500)  # under the ring's ~800 records: each run fits, whoever drains it
            got = [n + len(batch) for n, batch in zip(got, read_all(*readers, quiet=0.1), strict=True)]
        assert got == [5000] * 3
        readers.pop(0).close()  # the owner leaves; records meanwhile wait in the ring
        ring_unit(500)
        assert [len(batch) for batch in read_all(*readers)] == [500, 500]
        assert sorted(r._rings[UNIT].channel.owner for r in readers) == [False, True]
        assert all(r.lost() == {(UNIT, "ingress"): 0, (UNIT, "egress"): 0} for r in readers)
    finally:
        for r in readers:
            r.close()
    assert not any(p.name.endswith(".sock") for p in events_state_dir.joinpath("events").iterdir())


def test_a_subscriber_that_stops_reading_loses_only_its_own_events_counted(pin_root, ring_unit, monkeypatch):
    monkeypatch.setattr(fanout, "QUEUE_BYTES", 64 << 10)  # the owner is this process: a small queue fills soon
    owner, reading, stalled = (BpfEvents(pin_root, [UNIT]) for _ in range(3))
    try:
        seen = 0
        for _ in range(100):
            ring_unit(500)
            seen += len(owner.read(0.05))
            seen_by_reading = len(reading.read(0.05))
            assert seen_by_reading == 500
        assert seen == 50_000
        late = read_all(stalled, owner)[0]
        lost = stalled.lost()[(UNIT, "ingress")]
        assert 0 < lost and len(late) + lost == 50_000
        assert owner.lost()[(UNIT, "ingress")] == reading.lost()[(UNIT, "ingress")] == 0
    finally:
        for r in (stalled, reading, owner):
            r.close()


def test_only_root_reads_a_unit_s_events(pin_root, ring_unit, events_state_dir):
    """The meeting place is root's, 0700; and an owner refuses a peer that is not root even where
    the directory would let it in (its mode loosened here on purpose)."""
    events = events_state_dir / "events"
    with BpfEvents(pin_root, [UNIT]) as owner:
        assert stat.S_IMODE(os.stat(events).st_mode) == 0o700 and os.stat(events).st_uid == 0
        sock = next(p for p in events.iterdir() if p.name.endswith(".sock"))
        probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\n"
                 "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('refused');sys.exit()\n"
                 "s.settimeout(5)\nprint('data' if s.recv(100) else 'closed')\n")

        def as_nobody():
            return subprocess.run([PYTHON, "-c", probe, str(sock)], user=65534, group=65534, capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        assert as_nobody() == "refused"
        for p in (events_state_dir.parent, events_state_dir, events):
            os.chmod(p, 0o755)
        os.chmod(sock, 0o777)
        result = []
        proc = subprocess.Popen([PYTHON, "-c", probe, str(sock)], user=65534, group=65534, stdout=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                ring_unit(1)
                owner.read(0.05)  # the owner accepts, sees a stranger and hangs up
            result.append(proc.communicate(timeout=30)[0].strip())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert result == ["closed"]
        assert not owner._rings[UNIT].channel.subscribers
