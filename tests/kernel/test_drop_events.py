"""Drop events of the bpf backend, real parts: packets over loopback dropped by a unit attached
to a test cgroup, read back by `bpfwall monitor`; floods through BPF_PROG_TEST_RUN on the
pinned program for the kernel's rate limit and its loss accounting."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time

import pytest

from bpfwall.backends import bpf
from bpfwall.backends.bpf_events import BpfEvents
from bpfwall.build import UnitProgram
from bpfwall.kernel import cgroup, progs
from bpfwall.lang.checker import analyze
from tests.kernel.invoke import PYTHON, REPO, bpfwall
from tests.kernel.sockets import V4, V6, arrived, bound, receive_all
from tests.kernel.watcher import attached_id, inside, mkcg, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks", "events_state_dir")]

UNIT = "ev.service"
CLOCK_MONOTONIC_COARSE = 6  # Linux; the time module does not name it


def load(pin_root, ingress="tcp", **log):
    bpf.load(pin_root, UNIT, UnitProgram(analyze(ingress), None), log=log or None)


def monitor(*args) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "bpfwall", "monitor", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ))


UDP_PACKET = (struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes([192, 0, 2, 1]),
                          bytes([192, 0, 2, 2])) + struct.pack("!HHHH", 1234, 53, 8, 0))


def flood(pin_root, n: int) -> float:
    """`n` runs of the unit's ingress program on a UDP packet (which "tcp" drops); seconds taken."""
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        start = time.monotonic()
        progs.prog_test_run(u.progs["ingress"], b"\0" * 12 + b"\x08\x00" + UDP_PACKET, n)
        return time.monotonic() - start


def read_all(source, quiet=0.3) -> list:
    out = []
    while batch := source.read(quiet):
        out += batch
    return out


@pytest.mark.parametrize("host,family", [V4, V6], ids=["ipv4", "ipv6"])
def test_monitor_shows_exactly_the_dropped_packets(pin_root, temp_cgroup, host, family):
    allowed, denied = bound(temp_cgroup, host, family), bound(temp_cgroup, host, family)
    with allowed, denied, socket.socket(family, socket.SOCK_DGRAM) as tx:
        pa, pd = allowed.getsockname()[1], denied.getsockname()[1]
        load(pin_root, f"udp && local_port == {pa}")
        bpf.attach(pin_root, UNIT, temp_cgroup.path)
        mon = monitor(UNIT, "--json", "--count", "20")
        for _ in range(20):
            tx.sendto(b"x" * 10, (host, pa))
            tx.sendto(b"y" * 10, (host, pd))
        sport = tx.getsockname()[1]
        assert receive_all(allowed) == 20 and receive_all(denied) == 0
        out, err = mon.communicate(timeout=30)
    assert mon.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    header = 20 if family == socket.AF_INET else 40
    expected = {"unit": UNIT, "direction": "ingress", "verdict": "drop", "family": 4 if family == socket.AF_INET else 6,
                "proto": "udp", "saddr": host, "daddr": host, "sport": sport, "dport": pd, "icmp_type": None,
                "icmp_code": None, "length": header + 8 + 10, "cgroup_id": cgroup.cgroup_id(temp_cgroup.path)}
    assert len(events) == 20
    for e in events:
        assert abs(e.pop("time") - time.time()) < 30
        assert e == expected
    # exactly those: nothing else waits in the ring, nothing was lost
    with BpfEvents(pin_root, [UNIT]) as source:
        assert read_all(source) == []
        assert source.lost() == {(UNIT, "ingress"): 0, (UNIT, "egress"): 0}


def test_monitor_line_is_a_firewall_log_line(pin_root):
    load(pin_root)
    flood(pin_root, 1)
    r = bpfwall("monitor", UNIT, "--count", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(f" {UNIT} ingress DROP udp 192.0.2.1:1234 → 192.0.2.2:53 len 28\n"), r.stdout


def test_rate_limit_holds_and_every_loss_is_counted(pin_root):
    load(pin_root, log_rate=1000, log_burst=50)
    with BpfEvents(pin_root, [UNIT]) as source:
        seconds = flood(pin_root, 100_000)
        got = read_all(source)
        lost = source.lost()
    # The bucket runs on the coarse clock, which lags by up to one tick: one tick's refill more.
    tick = time.clock_getres(CLOCK_MONOTONIC_COARSE)
    assert 50 <= len(got) <= 50 + 1000 * (seconds + tick), (len(got), seconds, tick)
    assert len(got) + lost[(UNIT, "ingress")] == 100_000
    assert lost[(UNIT, "egress")] == 0
    stats = bpf.stats(pin_root, UNIT)
    assert stats["events"] == {"log_rate": 1000, "log_burst": 50, "lost": {"ingress": 100_000 - len(got), "egress": 0}}
    assert stats["counters"]["ingress"]["drop"]["packets"] == 100_000


def test_a_full_ring_loses_events_counted(pin_root):
    load(pin_root, log_rate=1_000_000, log_burst=1_000_000)  # the limit never bites: the ring fills
    with BpfEvents(pin_root, [UNIT]) as source:
        flood(pin_root, 100_000)
        got = read_all(source)
        lost = source.lost()[(UNIT, "ingress")]
    assert 0 < len(got) < 100_000 and len(got) + lost == 100_000


def test_log_rate_zero_turns_events_off_live(pin_root):
    load(pin_root)
    assert bpfwall("set", UNIT, "log_rate=0").returncode == 0
    with BpfEvents(pin_root, [UNIT]) as source:
        flood(pin_root, 1000)
        assert read_all(source, 0.1) == []
        assert source.lost()[(UNIT, "ingress")] == 0  # off is not lost
    assert bpf.stats(pin_root, UNIT)["events"]["log_rate"] == 0


def test_bad_log_values_change_nothing(pin_root):
    load(pin_root, log_rate=7, log_burst=9)
    for bad in ("log_rate=-1", "log_burst=1000001", "log_rate=ten"):
        r = bpfwall("set", UNIT, "log_burst=5", bad)
        assert r.returncode == 2 and r.stderr.startswith("bpfwall: error: "), r.stderr
    assert bpf.stats(pin_root, UNIT)["events"]["log_burst"] == 9


def test_the_limit_survives_a_reload(pin_root):
    load(pin_root, log_rate=7, log_burst=9)
    load(pin_root, "udp")
    assert bpf.stats(pin_root, UNIT)["events"]["log_rate"] == 7


def _first_line(mon: subprocess.Popen, pin_root) -> str:
    flood(pin_root, 1)
    return mon.stdout.readline()


def test_monitor_ends_cleanly_on_sigint(pin_root):
    load(pin_root)
    mon = monitor(UNIT)
    try:
        assert " DROP udp " in _first_line(mon, pin_root)
        mon.send_signal(signal.SIGINT)
        _, err = mon.communicate(timeout=30)
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
    assert mon.returncode == 0, err
    assert err.startswith("bpfwall monitor: 1 events shown, 0 lost"), err


def test_monitor_ends_cleanly_on_a_closed_pipe(pin_root):
    load(pin_root, log_rate=1_000_000, log_burst=1_000_000)
    mon = monitor(UNIT)
    head = subprocess.Popen(["head", "-3"], stdin=mon.stdout, stdout=subprocess.PIPE, text=True)
    mon.stdout.close()
    try:
        deadline = time.monotonic() + 30
        while mon.poll() is None and time.monotonic() < deadline:
            flood(pin_root, 10)
            time.sleep(0.01)
        lines = head.communicate(timeout=30)[0].splitlines()
        err = mon.stderr.read()
    finally:
        if mon.poll() is None:
            mon.kill()
        mon.wait()
        mon.stderr.close()
    assert mon.returncode == 0, err
    assert err == ""
    assert len(lines) == 3 and all(" DROP udp " in line for line in lines)


def test_audit_mode_reports_would_be_drops(pin_root):
    load(pin_root)
    assert bpfwall("set", UNIT, "mode=audit").returncode == 0
    with BpfEvents(pin_root, [UNIT]) as source:
        flood(pin_root, 3)
        got = read_all(source)
    assert [(e.verdict, e.direction, e.proto_name, e.dport) for e in got] == [("audit", "ingress", "udp", 53)] * 3
    assert " AUDIT udp " in got[0].line()


def test_egress_drops_are_events_of_the_egress_direction(pin_root, temp_cgroup):
    bpf.load(pin_root, UNIT, UnitProgram(None, analyze("tcp")))
    bpf.attach(pin_root, UNIT, temp_cgroup.path)
    with BpfEvents(pin_root, [UNIT]) as source, temp_cgroup.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(4):
            with pytest.raises(PermissionError):
                tx.sendto(b"z", ("127.0.0.1", 9))
        got = read_all(source)
        lost = source.lost()
    assert [(e.direction, e.verdict, e.dport, e.length) for e in got] == [("egress", "drop", 9, 29)] * 4
    assert {e.cgroup_id for e in got} == {cgroup.cgroup_id(temp_cgroup.path)}
    assert lost == {(UNIT, "ingress"): 0, (UNIT, "egress"): 0}
    r = bpfwall("stats", UNIT)
    assert "  drop events: up to 100/s, burst 200; lost: ingress 0, egress 0" in r.stdout, r.stdout


def test_load_options_set_the_limit_and_a_reload_without_them_keeps_it(pin_root):
    r = bpfwall("load", UNIT, "--ingress", "tcp", "--log-rate", "7", "--log-burst", "9")
    assert r.returncode == 0, r.stderr
    assert bpf.stats(pin_root, UNIT)["events"]["log_rate"] == 7
    assert bpfwall("load", UNIT, "--ingress", "udp", "--log-burst", "11").returncode == 0
    events = bpf.stats(pin_root, UNIT)["events"]
    assert (events["log_rate"], events["log_burst"]) == (7, 11)
    r = bpfwall("load", UNIT, "--ingress", "udp", "--log-rate", "2000000")
    assert r.returncode == 2 and "--log-rate=2000000" in r.stderr
    assert bpf.stats(pin_root, UNIT)["events"]["log_rate"] == 7


def test_apply_takes_the_limit_from_the_policy(pin_root, trusted_tmp_path):
    policy = trusted_tmp_path / "policy"
    policy.mkdir()
    (policy / "10-test.toml").write_text(f'[defaults]\nlog_burst = 40\n[units."{UNIT}"]\ningress = "tcp"\nlog_rate = 3\n')
    r = bpfwall("apply", UNIT, "--policy-dir", str(policy))
    assert r.returncode == 0, r.stderr
    events = bpf.stats(pin_root, UNIT)["events"]
    assert (events["log_rate"], events["log_burst"]) == (3, 40)
    assert bpfwall("apply", UNIT, "--policy-dir", str(policy), "--log-rate", "5").returncode == 0
    assert bpf.stats(pin_root, UNIT)["events"]["log_rate"] == 5  # the command line over the policy


def test_the_watcher_forwards_drop_events_capped_per_second(daemon, policy_dir, pin_root, subtree):
    """With its log on stderr (no journal here: the systemd tier checks journalctl -u), the watcher
    writes each drop event's line, at most --drop-events a unit and second, then a summary."""
    write_policy(policy_dir, unit("a.service", ingress="tcp", extra="log_rate = 1000\nlog_burst = 1000"))
    a = mkcg(subtree, "a.service")
    plain = daemon.args
    daemon.args = lambda *extra: plain(*extra, "--drop-events", "5")  # what start() runs, with a cap of 5
    daemon.start()
    wait_for("a.service attached", lambda: attached_id(pin_root, a) is not None)
    assert bpf.stats(pin_root, "a.service")["events"]["log_rate"] == 1000
    with inside(a):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        rx.bind(("127.0.0.1", 0))
        assert arrived(rx, tx, rx.getsockname()[1], count=8) == 0
    pattern = re.compile(r"\d\d:\d\d:\d\d\.\d{3} a\.service ingress DROP udp 127\.0\.0\.1:\d+ → 127\.0\.0\.1:\d+ len 32")
    wait_for("the summary", lambda: "a.service: 3 drop events not logged (more than 5 a second)" in daemon.log())
    assert len([line for line in daemon.log().splitlines() if pattern.fullmatch(line)]) == 5


def test_event_times_are_the_clock_s_to_the_tick(pin_root):
    """The program stamps records with jiffies (cheap); the offset it stores at each wakeup makes
    them CLOCK_MONOTONIC_COARSE, which lags the wall clock by at most a tick."""
    load(pin_root, log_rate=1_000_000, log_burst=1_000_000)
    tick = time.clock_getres(CLOCK_MONOTONIC_COARSE)
    with BpfEvents(pin_root, [UNIT]) as source:
        times = []
        for _ in range(5):
            before = time.time()
            flood(pin_root, 3)
            after = time.time()
            times += [(before, e.time, after) for e in read_all(source, 0.1)]
            time.sleep(0.05)  # past the program's wakeup interval: each flood wakes the reader anew
    assert len(times) == 15
    for before, t, after in times:
        assert before - 2 * tick <= t <= after + tick, (before, t, after)


def test_times_stay_right_across_a_change_of_the_limit(pin_root):
    """`set log_rate=` writes a fresh limit (its clock offset zeroed until the next wakeup):
    records written before it and read after keep their times."""
    load(pin_root, log_rate=1_000_000, log_burst=1_000_000)
    tick = time.clock_getres(CLOCK_MONOTONIC_COARSE)
    with BpfEvents(pin_root, [UNIT]) as source:
        before = time.time()
        flood(pin_root, 2)
        first = read_all(source, 0.1)
        flood(pin_root, 2)
        assert bpfwall("set", UNIT, "log_rate=999999").returncode == 0
        second = read_all(source, 0.1)
        after = time.time()
    assert len(first) == len(second) == 2
    assert all(before - 2 * tick <= e.time <= after + tick for e in first + second), (before, first + second, after)
