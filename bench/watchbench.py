"""What the watcher benchmarks share: a cgroup subtree, pin root, policy and state of their own,
the real `bpfwall watch` as a subprocess (ready when it says READY=1 on a notify socket we own),
and a cleanup that removes all of it."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bpfwall.backends import bpf  # noqa: E402
from bpfwall.kernel import cgroup  # noqa: E402

POLICY = '[units."app-*.scope"]\ningress = "udp || tcp && local_port in {80, 443}"\negress = "true"\n'


class Bench:
    def __init__(self, name: str, policy: str = POLICY):
        tag = uuid.uuid4().hex[:8]
        self.root = os.path.join(cgroup.cgroup2_mount(), f"bpfwall-bench-{name}-{tag}")
        self.pin_root = f"/sys/fs/bpf/bpfwall-bench-{name}-{tag}"
        # Under /run (root's, not shared like /tmp): bpfwall refuses policy files in a directory others can write.
        self.tmp = tempfile.mkdtemp(prefix=f"bpfwall-bench-{name}-", dir="/run")
        self.policy_dir = os.path.join(self.tmp, "policy")
        os.mkdir(self.policy_dir)
        with open(os.path.join(self.policy_dir, "bench.toml"), "w") as f:
            f.write(policy)
        os.mkdir(self.root)
        self.proc: subprocess.Popen | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify = f"@bpfwall-bench-{tag}"
        self.sock.bind(b"\0" + self.notify[1:].encode())

    def start(self) -> float:
        """Start the watcher; seconds until READY=1."""
        env = dict(os.environ, NOTIFY_SOCKET=self.notify, BPFWALL_LOG="stderr")
        log = open(os.path.join(self.tmp, "watch.log"), "a")
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bpfwall", "watch", "--cgroup-root", self.root, "--policy-dir", self.policy_dir,
             "--pin-root", self.pin_root, "--state-dir", os.path.join(self.tmp, "state")],
            stdout=log, stderr=log, env=env, cwd=REPO)
        log.close()
        self.sock.settimeout(120)
        while b"READY=1" not in self.sock.recv(4096).split(b"\n"):
            pass
        return time.perf_counter() - t

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # by PID: the process this bench started
            self.proc.wait(30)
        self.proc = None

    def prog_id(self, unit: str, direction: str = "ingress") -> int:
        with bpf.PinnedUnit.open(self.pin_root, unit) as u:
            return u.prog_ids()[direction]

    def rss_kib(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0])
        return out

    def close(self) -> None:
        self.stop()
        self.sock.close()
        if os.path.isdir(self.root):
            for dirpath, dirnames, _ in os.walk(self.root, topdown=False):
                for d in dirnames:
                    os.rmdir(os.path.join(dirpath, d))
            os.rmdir(self.root)
        if os.path.isdir(self.pin_root):
            for unit in bpf.units(self.pin_root):
                bpf.unload(self.pin_root, unit)
            os.rmdir(self.pin_root)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def write_json(name: str, data: dict) -> str:
    out = os.path.join(REPO, "bench", "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path
