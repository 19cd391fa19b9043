"""`bpfwall watch` as a real daemon for the tests: a subprocess with its own cgroup subtree, pin
root, policy directory and state directory (the `subtree`, `pin_root`, `policy_dir` fixtures),
telling a notify socket the test owns when it is ready; policies written as the admin would, and
what is attached where.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager

from bpfwall.backends import bpf
from bpfwall.kernel import cgroup
from bpfwall.sandbox import own_cgroup_path
from tests.kernel.invoke import PYTHON, REPO

WAIT = 10.0  # generous: only a bound on how long a broken test hangs, not a timing assertion


def wait_for(what, condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def remove_tree(path: str) -> None:
    """rmdir a cgroup subtree, deepest first (cgroups cannot be removed recursively)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for d in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, d))
            except FileNotFoundError:
                pass
    os.rmdir(path)


class Daemon:
    """One `bpfwall watch` process and the notify socket it reports to."""

    def __init__(self, tmp_path, root: str, pin_root: str, policy_dir):
        self.tmp_path, self.root, self.pin_root, self.policy_dir = tmp_path, root, pin_root, policy_dir
        self.state_dir = tmp_path / "state"
        self.proc: subprocess.Popen | None = None
        self.notify_name = f"@bpfwall-test-{uuid.uuid4().hex[:10]}"  # abstract socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.notify_name[1:].encode())
        self.messages: list[str] = []
        self.runs = 0

    def args(self, *extra):
        return [PYTHON, "-m", "bpfwall", "watch", "--cgroup-root", self.root, "--policy-dir", str(self.policy_dir),
                "--pin-root", self.pin_root, "--state-dir", str(self.state_dir), *extra]

    def start(self, wait_ready=True, extra=()):
        """Run `bpfwall watch -v EXTRA…`; with `wait_ready`, return once it said READY=1."""
        self.runs += 1
        self.log_path = self.tmp_path / f"watch-{self.runs}.log"
        env = {**os.environ, "NOTIFY_SOCKET": self.notify_name, "BPFWALL_LOG": "stderr"}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.args("-v", *extra), stderr=log, stdout=log, env=env, cwd=REPO)
        if wait_ready:
            self.wait_message("READY=1")
        return self

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            msg = self.sock.recv(4096).decode()
        except (TimeoutError, socket.timeout):
            return None
        self.messages.append(msg)
        return msg

    def wait_message(self, line: str) -> str:
        """The next datagram holding `line`; fails early if the daemon died."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            msg = self.receive(0.1)
            if msg is not None and line in msg.splitlines():
                return msg
            if self.proc.poll() is not None and msg is None:
                raise AssertionError(f"bpfwall watch exited ({self.proc.returncode}):\n{self.log()}")
        raise AssertionError(f"no {line} from bpfwall watch:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def wait_exit(self) -> int:
        return self.proc.wait(WAIT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by PID: only the process this test started
            self.proc.wait()

    def close(self):
        self.stop()
        self.sock.close()

def write_policy(policy_dir, text: str, name="10-test.toml") -> None:
    tmp = policy_dir / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, policy_dir / name)


def unit(name, ingress=None, egress=None, extra="") -> str:
    lines = [f'[units."{name}"]']
    if ingress:
        lines.append(f'ingress = "{ingress}"')
    if egress:
        lines.append(f'egress = "{egress}"')
    return "\n".join(lines) + "\n" + extra + "\n"


def mkcg(root, rel) -> str:
    path = os.path.join(root, rel)
    os.makedirs(path)
    return path


def ours(pin_root, path, direction="ingress") -> list[int]:
    """Ids of our pin root's programs attached to this cgroup itself."""
    ids = set()
    for name in bpf.units(pin_root):
        ids |= set(pinned_ids(pin_root, name).values())
    return [pid for pid in cgroup.query(path, direction)[1] if pid in ids]


def pinned_ids(pin_root, name) -> dict[str, int]:
    with bpf.PinnedUnit.open(pin_root, name) as u:
        return u.prog_ids()


def attached_id(pin_root, path, direction="ingress") -> int | None:
    found = ours(pin_root, path, direction)
    assert len(found) <= 1, f"{path}: attached more than once: {found}"
    return found[0] if found else None

@contextmanager
def inside(path):
    """Run the body with this process in cgroup `path` (its sockets belong there)."""
    home = own_cgroup_path()
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")
    try:
        yield
    finally:
        with open(os.path.join(home, "cgroup.procs"), "w") as f:
            f.write("0")

def nft_unit(name, ingress=None, egress=None) -> str:
    return unit(name, ingress, egress, 'backend = "nft"')


class NftDaemon(Daemon):
    """The daemon in the test's network namespace, on the test's table."""

    def __init__(self, tmp_path, root, pin_root, policy_dir, netns, table, prefix=()):
        super().__init__(tmp_path, root, pin_root, policy_dir)
        self.netns, self.table, self.prefix = netns, table, list(prefix)
        # Abstract sockets belong to a network namespace: the daemon reports to a path instead.
        self.sock.close()
        self.notify_name = str(tmp_path / f"notify-{uuid.uuid4().hex[:6]}.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.notify_name)

    def args(self, *extra):
        return ["nsenter", f"--net=/run/netns/{self.netns}", *self.prefix,
                *super().args("--table", self.table, *extra)]

    def wait_status(self, status: str) -> None:
        """The daemon has reported STATUS=<status> (now or in a datagram still to come)."""
        line = f"STATUS={status}"
        wait_for(line, lambda: any(line in m.splitlines() for m in self.messages) or self.receive(0.1) and False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
