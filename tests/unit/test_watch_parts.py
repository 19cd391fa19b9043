"""The watcher's pure parts, no root needed: inotify event parsing, sd_notify, log records, state."""
from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from bpfwall.watch import inotify as ino
from bpfwall.watch.log import DEBUG, WARNING, Log
from bpfwall.watch.notify import Notifier
from bpfwall.watch.state import Owned, State, WatchError


def raw_event(wd, mask, name=b"", pad=0):
    body = name + b"\0" * pad if name or pad else b""
    return struct.pack("=iIII", wd, mask, 0, len(body)) + body


def test_parse_events_reads_names_and_padding():
    buf = raw_event(3, ino.IN_CREATE | ino.IN_ISDIR, b"nginx.service", 3) + raw_event(-1, ino.IN_Q_OVERFLOW) \
        + raw_event(7, ino.IN_IGNORED)
    events = ino.parse_events(buf)
    assert [(e.wd, e.name) for e in events] == [(3, "nginx.service"), (-1, ""), (7, "")]
    assert events[0].mask & ino.IN_ISDIR and events[1].mask == ino.IN_Q_OVERFLOW


def test_inotify_reports_a_new_directory(tmp_path):
    with ino.Inotify() as watch:
        wd = watch.add(str(tmp_path), ino.IN_CREATE | ino.IN_ONLYDIR)
        assert watch.read() == []
        (tmp_path / "a.service").mkdir()
        (tmp_path / "file").write_text("x")
        events = watch.read()
        assert [(e.wd, e.name, bool(e.mask & ino.IN_ISDIR)) for e in events] == \
            [(wd, "a.service", True), (wd, "file", False)]
        assert watch.add(str(tmp_path / "missing"), ino.IN_CREATE) is None


def test_importing_inotify_starts_no_process():
    """libc is the one this process has: ctypes.util.find_library would run ldconfig (a
    subprocess, and a PATH lookup) every time the watcher starts."""
    code = ("import ctypes.util, subprocess\n"
            "def refuse(*a, **k): raise AssertionError('a process was started at import')\n"
            "ctypes.util.find_library = subprocess.Popen = refuse\n"
            "import bpfwall.watch.inotify as ino\n"
            "with ino.Inotify() as w: print(w.add('/', ino.IN_CREATE) is not None)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True\n"


@pytest.fixture
def receiver():
    name = f"bpfwall-unit-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    with sock:
        yield "@" + name, sock


def test_the_status_line_counts_entries_and_cgroups_in_plain_words():
    from bpfwall.watch.daemon import status_line

    assert status_line([], {}) == "no policy entries"
    assert status_line(["a.service"], {}) == "1 policy entry loaded, no cgroup of theirs exists now"
    assert status_line(["a.service"], {"/c/a": "a.service"}) == "policing 1 cgroup with 1 policy entry"
    assert (status_line(["a.service", "app-*.scope", "b.service"], {"/c/a": "a.service", "/c/b": "b.service"})
            == "policing 2 cgroups with 3 policy entries (1 of them matches no cgroup now)")
    assert (status_line(["a", "b", "c"], {"/c/a": "a"})
            == "policing 1 cgroup with 3 policy entries (2 of them match no cgroup now)")


def test_notify_abstract_socket(receiver):
    address, sock = receiver
    n = Notifier(address)
    assert n.ready("policing 1 units on 2 cgroups")
    assert sock.recv(4096) == b"READY=1\nSTATUS=policing 1 units on 2 cgroups"
    assert n.reloading()
    lines = sock.recv(4096).decode().splitlines()
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1][15:]) > 0
    n.close()


def test_notify_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert Notifier(path).stopping()
        assert sock.recv(64) == b"STOPPING=1"


def test_notify_never_blocks_on_a_full_queue(receiver):
    address, _ = receiver  # nobody reads: the queue fills
    n = Notifier(address)
    sent = [n.status(f"update {i}") for i in range(100)]
    assert sent[0] and not sent[-1]  # later updates were dropped, not waited for
    t = time.monotonic()
    assert not n.send("READY=1", wait=0.2)
    assert time.monotonic() - t < 5  # bounded by `wait`, far from hanging
    n.close()


def test_notify_without_socket_is_a_no_op():
    assert not Notifier("").ready()
    assert not Notifier("relative/path").ready()


def test_log_stderr_lines_and_debug_only_when_verbose(monkeypatch):
    monkeypatch.setenv("BPFWALL_LOG", "stderr")
    out = io.StringIO()
    log = Log(verbose=False, stream=out)
    assert not log.to_journal
    log.info("attach", "a.service → /x (ingress)", unit="a.service", cgroup="/x", direction="ingress")
    log.warning("reload", "bad; keeping the running policy")
    log.debug("vanished", "gone")
    assert out.getvalue().splitlines() == ["attach: a.service → /x (ingress)",
                                           "warning: reload: bad; keeping the running policy"]


def test_log_journal_fields():
    sent = []
    log = Log(verbose=True, send=lambda message, **fields: sent.append((message, fields)))
    log.event("detach", "a.service ✕ /x", WARNING, unit="a.service", cgroup="/x", direction="egress", entry="a*")
    log.debug("vanished", "gone")
    message, fields = sent[0]
    assert message == "a.service ✕ /x"
    assert fields == {"PRIORITY": "4", "BPFWALL_ACTION": "detach", "SYSLOG_IDENTIFIER": "bpfwall",
                      "UNIT": "a.service", "BPFWALL_CGROUP": "/x", "BPFWALL_DIRECTION": "egress",
                      "BPFWALL_ENTRY": "a*"}
    assert sent[1][1]["PRIORITY"] == str(DEBUG)


def test_state_round_trip_and_lock(tmp_path):
    state = State(str(tmp_path), "/sys/fs/bpf/x")
    state.lock()
    try:
        state.units = {"a.service": Owned("f1", "bpf", {"ingress": 5})}
        state.write()
        again = State(str(tmp_path), "/sys/fs/bpf/x")
        again.read()
        assert again.units == state.units
        with pytest.raises(WatchError, match="another bpfwall watch manages the pin root"):
            again.lock()
        other = State(str(tmp_path), "/sys/fs/bpf/y")  # another pin root: another file
        other.read()
        assert other.units == {} and other.path != state.path
    finally:
        state.unlock()


def test_state_ignores_a_damaged_file(tmp_path):
    state = State(str(tmp_path), "/sys/fs/bpf/x")
    os.makedirs(tmp_path, exist_ok=True)
    with open(state.path, "w") as f:
        f.write("{not json")
    state.read()
    assert state.units == {}
