"""`bpfwall run` without systemd (this host): a cgroup of its own, joined before exec.

Receivers live in the test process, outside the command's cgroup, so they count
exactly what the command's egress filter let out.
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

from bpfwall.backends import bpf
from bpfwall.sandbox import own_cgroup_path

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
SENDS = 5


def _bpfwall(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpfwall", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


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
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return bool(f.read().split())
    except FileNotFoundError:
        return False


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
    from bpfwall import run

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
