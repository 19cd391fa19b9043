"""`bpfwall run` without systemd (this host): a cgroup of its own, joined before exec; and
what a killed run leaves, removed by `bpfwall gc` and by the next run.

Receivers live in the test process, outside the command's cgroup, so they count
exactly what the command's egress filter let out. Every test keeps its run records in a
state directory of its own ($BPFWALL_STATE_DIR).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from bpfwall import run, runrecord, unitkey
from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.kernel import cgroup
from bpfwall.lang.checker import analyze_pair
from bpfwall.leftovers import procs
from bpfwall.sandbox import TempCgroup, own_cgroup_path

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SENDS = 5


def _bpfwall(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpfwall", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(autouse=True)
def state_dir(trusted_tmp_path, monkeypatch):
    """Run records of this test only, where bpfwall trusts them (under /run, not /tmp); the
    bpfwall processes inherit the variable."""
    path = trusted_tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("BPFWALL_STATE_DIR", str(path))
    return path


@pytest.fixture
def receivers():
    """Two UDP sockets on loopback, outside any test cgroup: (allowed, blocked)."""
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.settimeout(0.2)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def _count(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(64)
        except socket.timeout:
            return n
        n += 1


def _sender(ports, exit_code: int = 0, delay: float = 0) -> str:
    return textwrap.dedent(f"""
        import socket, sys, time
        time.sleep({delay})
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range({SENDS}):
            for port in {list(ports)}:
                try:
                    s.sendto(b"x", ("127.0.0.1", port))
                except PermissionError:
                    pass  # the egress filter's drop: sendto() says EPERM
        sys.exit({exit_code})
    """)


def _run_cgroups() -> set[str]:
    return {n for n in os.listdir(own_cgroup_path()) if n.startswith("run-bpfwall-")}


def _nothing_left(pin_root: str, unit: str | None = None, before: set[str] = frozenset()) -> None:
    """No pins; no cgroup of this run (by name, or new run-bpfwall-* ones)."""
    assert bpf.units(pin_root) == []
    if unit is not None:
        assert not os.path.exists(os.path.join(own_cgroup_path(), unit))
    assert _run_cgroups() <= before


def _name() -> str:
    return f"bpfwall-test-{uuid.uuid4().hex[:10]}"


def test_run_filters_from_the_first_socket_and_keeps_the_exit_status(no_leaks, pin_root, receivers):
    allowed, blocked = (s.getsockname()[1] for s in receivers)
    before = _run_cgroups()
    rc, out, err = _finish(_bpfwall("run", "--egress", f"udp && remote_port == {allowed}", "--",
                                    sys.executable, "-c", _sender((allowed, blocked), exit_code=7)))
    assert rc == 7, err
    assert [_count(s) for s in receivers] == [SENDS, 0]
    _nothing_left(pin_root, before=before)


def test_run_with_a_name_is_visible_while_it_runs(no_leaks, pin_root):
    name = _name()
    proc = _bpfwall("run", "--name", name, "--ingress", "tcp", "--egress", "udp", "--", "sleep", "30")
    try:
        cgroup = os.path.join(own_cgroup_path(), f"{name}.scope")
        deadline = time.monotonic() + 30
        while not _cgroup_has_procs(cgroup):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never appeared in its cgroup"
            time.sleep(0.02)
        stats = bpf.stats(pin_root, f"{name}.scope")
        assert sorted((a["cgroup"], a["direction"]) for a in stats["attached"]) == \
            [(cgroup, "egress"), (cgroup, "ingress")]
        proc.send_signal(signal.SIGTERM)  # forwarded to sleep, which dies of it
        rc, _, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 128 + signal.SIGTERM, err
    _nothing_left(pin_root, f"{name}.scope")


def _cgroup_has_procs(path: str) -> bool:
    return bool(procs(path))


def test_a_command_killed_by_a_signal_exits_128_plus_n(no_leaks, pin_root):
    name = _name()
    rc, _, err = _finish(_bpfwall("run", "--name", name, "--egress", "true", "--", sys.executable, "-c",
                                  "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert rc == 128 + signal.SIGKILL, err
    _nothing_left(pin_root, f"{name}.scope")


def test_processes_left_behind_stay_filtered_until_they_exit(no_leaks, pin_root, receivers):
    """sh exits at once; its background child sends afterwards, still through the filter."""
    allowed, blocked = (s.getsockname()[1] for s in receivers)
    script = Path(pin_root).name + ".py"  # a unique file name for the background sender
    path = Path("/tmp") / script
    path.write_text(_sender((allowed, blocked), delay=0.5))
    name = _name()
    try:
        rc, _, err = _finish(_bpfwall("run", "--name", name, "--egress", f"udp && remote_port == {allowed}",
                                      "--", "sh", "-c", f"{sys.executable} {path} & exit 3"))
    finally:
        path.unlink()
    assert rc == 3, err
    assert [_count(s) for s in receivers] == [SENDS, 0]
    _nothing_left(pin_root, f"{name}.scope")


def test_bad_expression_starts_nothing(no_leaks, pin_root, tmp_path):
    marker, name = tmp_path / "started", _name()
    rc, _, err = _finish(_bpfwall("run", "--name", name, "--egress", "udp && remote_port == 70000", "--",
                                  "touch", str(marker)))
    assert rc == 2 and err.startswith("bpfwall: error: --egress: "), err
    assert "70000" in err
    assert not marker.exists()
    assert not os.path.exists(pin_root)
    _nothing_left(pin_root, f"{name}.scope")


def test_taken_name_is_refused(no_leaks, pin_root, tmp_path):
    name = _name()
    bpf_load = _finish(_bpfwall("load", f"{name}.scope", "--egress", "udp"))
    assert bpf_load[0] == 0, bpf_load[2]
    marker = tmp_path / "started"
    rc, _, err = _finish(_bpfwall("run", "--name", name, "--egress", "tcp", "--", "touch", str(marker)))
    assert rc == 2 and "is loaded already" in err
    assert not marker.exists()
    assert bpf.stats(pin_root, f"{name}.scope")["egress"] == "udp"  # untouched


def test_the_scopes_first_process_execs_only_under_the_filters(no_leaks, pin_root, temp_cgroup, tmp_path):
    """On the systemd path the command starts only if systemd really attached the programs
    (systemd merely warns when it cannot): fail closed."""
    unit, marker = f"{_name()}.scope", tmp_path / "started"
    assert _finish(_bpfwall("load", unit, "--egress", "udp"))[0] == 0
    with bpf.PinnedUnit.open(pin_root, unit) as u:
        argv = run._verify_argv(unit, u.prog_ids()) + ["touch", str(marker)]
    refused = subprocess.run(argv, preexec_fn=temp_cgroup.join_in_child, capture_output=True, text=True)
    assert refused.returncode == run.EXIT_CANNOT_RUN
    assert f"systemd did not attach the egress filter of {unit}" in refused.stderr
    assert not marker.exists()

    bpf.attach(pin_root, unit, temp_cgroup.path)
    started = subprocess.run(argv, preexec_fn=temp_cgroup.join_in_child, capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    assert marker.exists()
    bpf.unload(pin_root, unit)


COUNT_SIGINT = textwrap.dedent("""
    import signal, sys, time
    got = []
    signal.signal(signal.SIGINT, lambda *_: got.append(1))
    print("ready", flush=True)
    while len(got) < 2 and time.monotonic() < START + 20:
        time.sleep(0.01)
    time.sleep(0.3)  # a duplicate would arrive now
    print("sigint", len(got), flush=True)
""")


def test_sigint_reaches_the_command_once_from_the_terminal_or_from_kill(no_leaks, pin_root):
    """^C goes to the terminal's whole foreground group, so bpfwall does not forward it again;
    a SIGINT sent to bpfwall alone is forwarded."""
    import pty

    name = _name()
    script = "import time; START = time.monotonic()\n" + COUNT_SIGINT
    pid, master = pty.fork()
    if pid == 0:  # the child: a session of its own on the pty, bpfwall in the foreground
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "bpfwall", "run", "--name", name, "--egress", "udp",
                                  "--", sys.executable, "-c", script])
    output = b""
    try:
        while b"ready" not in output:
            output += os.read(master, 1024)
        os.write(master, b"\x03")  # ^C: the line discipline signals the foreground group
        time.sleep(0.3)
        os.kill(pid, signal.SIGINT)  # to bpfwall alone: forwarded
        while True:
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the pty's other side is closed
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    assert b"sigint 2" in output, output
    assert os.waitstatus_to_exitcode(status) == 0
    _nothing_left(pin_root, f"{name}.scope")


# -- a killed run: what it leaves, and what removes it -------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# What a run SIGKILLed at each crash point (bpfwall/crashpoint.py) it reaches leaves:
# (its pins, its cgroup, programs on it). bpf.load pins `meta` last, so in the load:* steps
# the unit's directory is a load cut short.
CRASH_POINTS = {
    "run:recorded": (False, False, False),
    "load:built": (True, False, False),
    "load:maps-pinned": (True, False, False),
    "load:staged": (True, False, False),
    "load:swapped": (True, False, False),
    "load:programs-pinned": (True, False, False),
    "load:done": (True, False, False),
    "run:loaded": (True, False, False),
    "run:cgroup": (True, True, False),
    "attach:linked": (True, True, False),  # the link dies with bpfwall: it was never pinned
    "attach:pinned": (True, True, True),
    "run:attached": (True, True, True),
    "run:started": (True, True, True),  # the command outlives bpfwall: its own test below
    "run:exited": (True, True, True),
    "run:cgroup-removed": (True, False, False),
    "unload:link-detached": (True, False, False),
    "unload:unpinned": (True, False, False),
    "run:cleaned": (False, False, False),
}
CUT_SHORT = {"load:built", "load:maps-pinned", "load:staged", "load:swapped", "load:programs-pinned",
             "unload:unpinned"}  # no meta pinned (yet, or any more)


class Killed:
    """A `bpfwall run --name …` that SIGKILLed itself at a crash point ($BPFWALL_CRASH_AT)."""

    def __init__(self, step: str, command=("true",), egress: str = "udp", parent: str | None = None):
        self.unit = f"{_name()}.scope"
        join = None
        if parent is not None:
            def join():
                with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write("0")
        # The command may outlive bpfwall: it must not hold a pipe we wait on.
        with open(os.devnull, "w") as devnull:
            proc = subprocess.Popen([sys.executable, "-m", "bpfwall", "run", "--name", self.unit, "--egress",
                                     egress, "--", *command], cwd=REPO, stdout=devnull, stderr=devnull,
                                    env={**os.environ, "BPFWALL_CRASH_AT": step}, preexec_fn=join)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"bpfwall run did not stop at {step}"
        self.pid = proc.pid
        self.cgroup = os.path.join(parent or own_cgroup_path(), self.unit)

    def pins(self, pin_root: str) -> str:
        return bpf.unit_dir(pin_root, self.unit)

    def gone(self) -> str:
        return f"its bpfwall, pid {self.pid}, is gone"


@pytest.fixture
def killed():
    """Makes Killed runs; afterwards, what a failing test left in their cgroups (processes of
    ours) is killed by PID, and the cgroups removed."""
    made: list[Killed] = []

    def make(*args, **kw) -> Killed:
        made.append(Killed(*args, **kw))
        return made[-1]

    yield make
    for dead in made:
        for pid in procs(dead.cgroup):
            os.kill(pid, signal.SIGKILL)
        _wait_for(lambda cg=dead.cgroup: not _cgroup_has_procs(cg), f"{dead.cgroup} did not empty")
        if os.path.isdir(dead.cgroup):
            os.rmdir(dead.cgroup)


def _gc(*args) -> list[str]:
    rc, out, err = _finish(_bpfwall("gc", *args))
    assert rc == 0 and not err, err
    return out.splitlines()


def _records(state_dir: Path) -> list[str]:
    return sorted(os.listdir(state_dir))


def _waiting_sender(ports, marker: Path) -> str:
    """Sends (see _sender) once `marker` exists."""
    wait = (f"import os, time\nend = time.monotonic() + 60\n"
            f"while not os.path.exists({str(marker)!r}) and time.monotonic() < end: time.sleep(0.02)\n")
    return wait + _sender(ports)


def _attached(pin_root: str, unit: str) -> list[tuple[str, str]]:
    return sorted((a["cgroup"], a["direction"]) for a in bpf.stats(pin_root, unit)["attached"])


def _attached_by_name(pin_root: str, unit: str) -> list[dict]:
    """Where the unit's programs run, found by their names (also for a load cut short)."""
    return [a for entry in bpf.summary(pin_root) if entry["unit"] == unit for a in entry["attached"]]


def _wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_the_crash_points_cover_every_step_a_run_takes(no_leaks, pin_root, tmp_path):
    """CRASH_POINTS lists exactly the steps a run reaches (a new step must be classified there)."""
    log = tmp_path / "steps"
    proc = _bpfwall("run", "--egress", "udp", "--", "true", env={**os.environ, "BPFWALL_CRASH_LOG": str(log)})
    rc, _, err = _finish(proc)
    assert rc == 0, err
    assert list(dict.fromkeys(log.read_text().split())) == list(CRASH_POINTS)


def test_a_run_sigkilled_by_pid_leaves_nothing_for_good(no_leaks, pin_root, state_dir):
    """The issue as reported, no test hook: `kill -9` bpfwall while its command runs; once the
    command has exited, the next run removes the pins and cgroup the dead one left."""
    unit = f"{_name()}.scope"
    cg = os.path.join(own_cgroup_path(), unit)
    with open(os.devnull, "w") as devnull:  # sleep outlives bpfwall: no pipes to wait on
        proc = subprocess.Popen([sys.executable, "-m", "bpfwall", "run", "--name", unit, "--egress", "udp",
                                 "--", "sleep", "60"], cwd=REPO, stdout=devnull, stderr=devnull)
    try:
        _wait_for(lambda: _cgroup_has_procs(cg), "sleep never appeared in its cgroup")
    finally:
        proc.kill()
        proc.wait()
        for pid in procs(cg):  # sleep: ours
            os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not _cgroup_has_procs(cg), "sleep did not exit")
    assert bpf.units(pin_root) == [unit] and os.path.isdir(cg)  # what the dead run left
    try:
        rc, _, err = _finish(_bpfwall("run", "--egress", "udp", "--", "true"))
        assert rc == 0, err
        _nothing_left(pin_root, unit)
        assert _records(state_dir) == []
    finally:
        if os.path.isdir(cg):
            os.rmdir(cg)


def test_gc_removes_what_a_run_killed_at_each_step_left_and_nothing_else(
        no_leaks, pin_root, state_dir, receivers, temp_cgroup, killed, tmp_path):
    """Killed after every step of a run, in turn; after each `gc`, nothing of the dead run is
    left, while a live run beside it keeps its record, pins, cgroup and filter, and a unit
    loaded by hand under a run-like name keeps its pins and attachment."""
    allowed, blocked = (s.getsockname()[1] for s in receivers)
    marker = tmp_path / "send"
    live_unit = f"{_name()}.scope"
    live = _bpfwall("run", "--name", live_unit, "--egress", f"udp && remote_port == {allowed}", "--",
                    sys.executable, "-c", _waiting_sender((allowed, blocked), marker))
    foreign = f"run-bpfwall-{uuid.uuid4().hex[:12]}.scope"
    try:
        live_cgroup = os.path.join(own_cgroup_path(), live_unit)
        _wait_for(lambda: _cgroup_has_procs(live_cgroup), "the live run's command never started")
        live_record = _records(state_dir)
        assert len(live_record) == 1
        assert _finish(_bpfwall("load", foreign, "--egress", "tcp"))[0] == 0
        bpf.attach(pin_root, foreign, temp_cgroup.path)

        for step, (pinned, made, attached) in CRASH_POINTS.items():
            if step == "run:started":
                continue
            dead = killed(step)
            pins = dead.pins(pin_root)
            assert (os.path.isdir(pins), os.path.isdir(dead.cgroup)) == (pinned, made), step
            assert bool(_attached_by_name(pin_root, dead.unit)) == attached, step
            expected = []
            if made:
                expected.append(f"removed cgroup {dead.cgroup} ({dead.unit}: {dead.gone()})")
            if pinned:
                cut = "its load was cut short; " if step in CUT_SHORT else ""
                expected.append(f"removed pins {pins} ({dead.unit}: {cut}{dead.gone()})")
            nothing = ["no leftovers of killed bpfwall runs"]
            assert _gc("--dry-run") == ([e.replace("removed", "would remove", 1) for e in expected] or nothing), step
            assert (os.path.isdir(pins), os.path.isdir(dead.cgroup)) == (pinned, made), step
            assert _gc() == (expected or nothing), step
            assert not os.path.exists(pins) and not os.path.exists(dead.cgroup), step
            assert _records(state_dir) == live_record, step
            # Untouched: the live run and the unit loaded by hand.
            assert _attached(pin_root, live_unit) == [(live_cgroup, "egress")], step
            assert _cgroup_has_procs(live_cgroup) and live.poll() is None, step
            assert _attached(pin_root, foreign) == [(temp_cgroup.path, "egress")], step

        marker.touch()
        rc, _, err = _finish(live)
    finally:
        if live.poll() is None:
            live.terminate()  # forwarded to its command: bpfwall then cleans up
            live.wait(30)
    assert rc == 0, err
    assert [_count(s) for s in receivers] == [SENDS, 0]  # still filtered after every gc
    assert bpf.units(pin_root) == [foreign]
    assert _records(state_dir) == []


def test_a_killed_runs_command_stays_filtered_and_is_kept_until_it_exits(
        no_leaks, pin_root, state_dir, receivers, killed, tmp_path):
    """bpfwall killed after exec: its command outlives it. gc keeps everything (never unfilter
    a running process) and says so; once the command exits, gc removes it all."""
    allowed, blocked = (s.getsockname()[1] for s in receivers)
    marker = tmp_path / "send"
    dead = killed("run:started", (sys.executable, "-c", _waiting_sender((allowed, blocked), marker)),
                  egress=f"udp && remote_port == {allowed}")
    pins = dead.pins(pin_root)
    _wait_for(lambda: _cgroup_has_procs(dead.cgroup), "the command is not in its cgroup")
    (command_pid,) = procs(dead.cgroup)
    kept = [f"kept {dead.unit}: {dead.gone()}, but its command still runs in {dead.cgroup} "
            f"(pids {command_pid}) and stays filtered; run `bpfwall gc` again after it exits"]
    assert _gc("--dry-run") == kept
    assert _gc() == kept
    assert _attached(pin_root, dead.unit) == [(dead.cgroup, "egress")]
    assert len(_records(state_dir)) == 1
    # A run of the same name waits for it: the name is still in use.
    rc, _, err = _finish(_bpfwall("run", "--name", dead.unit, "--egress", "udp", "--", "true"))
    assert rc == 2 and f"{dead.unit} is in use by another bpfwall run" in err, err

    marker.touch()
    _wait_for(lambda: not _cgroup_has_procs(dead.cgroup), "the command did not exit")
    assert [_count(s) for s in receivers] == [SENDS, 0]
    assert _gc() == [f"removed cgroup {dead.cgroup} ({dead.unit}: {dead.gone()})",
                     f"removed pins {pins} ({dead.unit}: {dead.gone()})"]
    _nothing_left(pin_root, dead.unit)
    assert _records(state_dir) == []


def test_the_next_run_removes_what_a_killed_run_left(no_leaks, pin_root, state_dir, killed):
    dead = killed("run:attached")
    rc, _, err = _finish(_bpfwall("run", "--egress", "udp", "--", "true"))
    assert rc == 0, err
    assert err.splitlines() == [f"bpfwall: removed cgroup {dead.cgroup} ({dead.unit}: {dead.gone()})",
                                f"bpfwall: removed pins {dead.pins(pin_root)} ({dead.unit}: {dead.gone()})"]
    _nothing_left(pin_root, dead.unit)
    assert _records(state_dir) == []


def test_gc_leaves_a_unit_loaded_by_hand_under_a_killed_runs_name(no_leaks, pin_root, state_dir,
                                                                    temp_cgroup, killed):
    """The record names the unit, but only pins whose meta carries the run's token are the run's."""
    dead = killed("run:recorded")
    assert _finish(_bpfwall("load", dead.unit, "--egress", "tcp"))[0] == 0
    bpf.attach(pin_root, dead.unit, temp_cgroup.path)
    assert _gc() == [f"left alone pins {dead.pins(pin_root)} ({dead.unit}: not loaded by this run)"]
    assert _attached(pin_root, dead.unit) == [(temp_cgroup.path, "egress")]
    assert _records(state_dir) == []
    bpf.unload(pin_root, dead.unit)


def test_a_run_refused_for_a_taken_name_claims_nothing_there(no_leaks, pin_root, state_dir):
    """A name taken by a `bpfwall load` cut short (a directory without meta) refuses the run, and
    leaves no record by which gc could take that directory for the run's."""
    unit = f"{_name()}.scope"
    cut = _bpfwall("load", unit, "--egress", "udp", env={**os.environ, "BPFWALL_CRASH_AT": "load:staged"})
    assert _finish(cut)[0] == -signal.SIGKILL
    rc, _, err = _finish(_bpfwall("run", "--name", unit, "--egress", "udp", "--", "true"))
    assert rc == 2 and "is loaded already" in err, err
    assert _records(state_dir) == []
    assert _gc() == ["no leftovers of killed bpfwall runs"]
    assert bpf.units(pin_root) == [unit]


def test_gc_leaves_a_cgroup_a_user_put_in_a_killed_runs_place(no_leaks, pin_root, state_dir, temp_cgroup,
                                                                killed):
    """bpfwall ran in a cgroup delegated to a user, who may remove the dead run's empty cgroup
    and make one of their own under its name: gc must not take theirs for the run's."""
    os.chown(temp_cgroup.path, 65534, 65534)
    dead = killed("run:attached", parent=temp_cgroup.path)
    try:
        assert _attached(pin_root, dead.unit) == [(dead.cgroup, "egress")]
        for argv in (["rmdir", dead.cgroup], ["mkdir", dead.cgroup]):
            subprocess.run(NOBODY + argv, check=True)
        assert os.stat(dead.cgroup).st_uid == 65534
        assert _gc() == [
            f"left alone cgroup {dead.cgroup} ({dead.unit}: owned by uid 65534: not the cgroup bpfwall made)",
            f"removed pins {dead.pins(pin_root)} ({dead.unit}: {dead.gone()})"]
        assert os.path.isdir(dead.cgroup)
        assert bpf.units(pin_root) == [] and _records(state_dir) == []
    finally:
        if os.path.isdir(dead.cgroup):
            os.rmdir(dead.cgroup)


def test_records_are_believed_only_from_a_directory_and_files_of_ours(pin_root, state_dir, killed):
    """A state directory (or one above it) that others can write to is refused by gc and run:
    exit 2, the path named, nothing removed or started, whatever a user put there; a record
    file not ours is skipped, with the reason."""
    dead = killed("run:loaded")
    (record,) = _records(state_dir)
    victim = f"{_name()}.scope"
    assert _finish(_bpfwall("load", victim, "--egress", "udp"))[0] == 0
    forged = runrecord.Record(victim, os.path.realpath(pin_root), None, 1, "x").to_bytes()
    elsewhere = "set BPFWALL_STATE_DIR to a directory only root can write"
    refusals = {state_dir: f"the state directory {state_dir} is writable by group and others (mode 1777, shared like "
                           f"/tmp); fix: {elsewhere}",
                state_dir.parent: f"{state_dir.parent}, a directory above it, is writable by group and others (mode "
                                  f"0777); fix: chmod go-w {state_dir.parent}, or {elsewhere}"}
    for where, mode in ((state_dir, 0o1777), (state_dir.parent, 0o777)):
        old_modes = [p.stat().st_mode & 0o7777 for p in (where, state_dir.parent)]
        where.chmod(mode)
        try:
            if where == state_dir:  # a user plants a record naming a unit of root's
                state_dir.parent.chmod(0o711)
                name = runrecord.record_name(pin_root, unitkey.encode(victim))
                subprocess.run(NOBODY + ["sh", "-c", f"cat > {state_dir / name}"], input=forged, check=True)
            for argv in (["gc"], ["run", "--egress", "udp", "--", "true"]):
                rc, out, err = _finish(_bpfwall(*argv))
                assert rc == 2 and not out, argv
                assert err == f"bpfwall: error: {state_dir}: refused: {refusals[where]}\n", err
        finally:
            where.chmod(old_modes[0])
            state_dir.parent.chmod(old_modes[1])
    assert bpf.units(pin_root) == sorted([dead.unit, victim])

    os.unlink(state_dir / runrecord.record_name(pin_root, unitkey.encode(victim)))
    os.chown(state_dir / record, 65534, 65534)
    assert _gc() == [f"skipped record {state_dir / record} (it is owned by nobody (uid 65534), not root)"]
    assert os.path.isdir(dead.pins(pin_root)) and _records(state_dir) == [record]

    os.chown(state_dir / record, 0, 0)
    assert _gc() == [f"removed pins {dead.pins(pin_root)} ({dead.unit}: {dead.gone()})"]
    assert bpf.units(pin_root) == [victim]


def test_gc_on_the_systemd_path_removes_only_the_pins(no_leaks, pin_root, state_dir):
    """Under systemd the scope and the programs on it are systemd's: a dead run's pins go once the
    scope is empty, nothing is detached and no cgroup removed. Here the run's own steps are
    taken by hand, and a cgroup named after the scope in a slice plays the scope systemd
    attached the pinned programs to."""
    unit = f"{_name()}.scope"
    with TempCgroup("bpfwall-test-run", suffix=".slice") as slice_, \
            TempCgroup(parent=slice_.path, name=unit) as scope:
        _gc_on_the_systemd_path(pin_root, state_dir, unit, scope)


def _gc_on_the_systemd_path(pin_root, state_dir, unit, temp_cgroup):
    token = runrecord.new_token()
    record = runrecord.Record(unit, os.path.realpath(pin_root), None, os.getpid(), token)
    held = runrecord.create(pin_root, unitkey.encode(unit), record)
    bpf.load(pin_root, unit, run._marked(UnitProgram(*analyze_pair(None, "udp")), token))
    with bpf.PinnedUnit.open(pin_root, unit) as u:  # systemd's part: BPF_PROG_ATTACH of the pin
        cgroup.attach(temp_cgroup.path, u.progs["egress"], "egress")
        (prog_id,) = u.prog_ids().values()
    sleeper = subprocess.Popen(["sleep", "60"], preexec_fn=temp_cgroup.join_in_child)
    held.release(remove=False)  # the run dies: its lock goes with its file
    try:
        assert _gc() == [f"kept {unit}: its bpfwall, pid {os.getpid()}, is gone, but its command still runs "
                         f"in {temp_cgroup.path} (pids {sleeper.pid}) and stays filtered; run `bpfwall gc` "
                         "again after it exits"]
    finally:
        sleeper.kill()
        sleeper.wait()
    _wait_for(lambda: not _cgroup_has_procs(temp_cgroup.path), "sleep did not leave the cgroup")
    assert _gc() == [f"removed pins {bpf.unit_dir(pin_root, unit)} ({unit}: its bpfwall, pid {os.getpid()}, "
                     "is gone)"]
    assert bpf.units(pin_root) == [] and _records(state_dir) == []
    assert prog_id in cgroup.query(temp_cgroup.path, "egress")[1]  # systemd's attachment stays
