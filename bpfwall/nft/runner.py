"""Where libnftables runs: in this process on unified hosts, in a worker process with a
private mount namespace on hybrid ones (see worker.py). One interface for both:

    runner().json([...commands...])   one transaction of JSON commands; the output
    runner().text("add rule …")       one transaction in nft syntax (only for what the
                                       JSON parser of nft 1.0.6 cannot express)

A failed transaction changes nothing (the kernel aborts the whole batch) and
raises NftError with nft's first error line.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading

from ..kernel import cgroup
from .errors import NftError
from .worker import CGROUP_DIR


def _first_error(error: str) -> str:
    for line in error.splitlines():
        if "Error:" in line:
            return line.split("Error:", 1)[1].strip()
    return error.strip().splitlines()[0] if error.strip() else "unknown error"


def _check(rc: int, error: str, what: str) -> None:
    if rc != 0:
        raise NftError(f"nftables refused {what}: {_first_error(error)}")


class InProcess:
    """libnftables in this process (cgroup2 is at /sys/fs/cgroup already)."""

    def __init__(self):
        import nftables

        self.nft = nftables.Nftables()
        self.nft.set_json_output(True)
        self.lock = threading.Lock()

    def json(self, commands: list, what: str = "the change"):
        with self.lock:
            rc, output, error = self.nft.json_cmd({"nftables": commands})
        _check(rc, error, what)
        return output

    def text(self, command: str, what: str = "the change") -> str:
        with self.lock:
            rc, output, error = self.nft.cmd(command)
        _check(rc, error, what)
        return output

    def close(self) -> None:
        pass


class Worker:
    """libnftables in `python -m bpfwall.nft.worker`, which sees cgroup2 at /sys/fs/cgroup."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None

    def _start(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "bpfwall.nft.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, close_fds=True)
        hello = self.proc.stdout.readline()
        status = json.loads(hello) if hello else {"ready": False, "error": "the worker exited"}
        if not status.get("ready"):
            self.close()
            raise NftError(f"cannot start the nft worker (a mount namespace with cgroup2 at {CGROUP_DIR}): "
                           f"{status.get('error')}")

    def _ask(self, request: dict) -> dict:
        with self.lock:
            for attempt in (1, 2):  # a worker that died is restarted once
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                try:
                    self.proc.stdin.write(json.dumps(request) + "\n")
                    self.proc.stdin.flush()
                    line = self.proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    return json.loads(line)
                self.close()
            raise NftError("the nft worker died while running a request")

    def json(self, commands: list, what: str = "the change"):
        answer = self._ask({"json": {"nftables": commands}})
        _check(answer["rc"], answer["error"], what)
        return answer["output"]

    def text(self, command: str, what: str = "the change") -> str:
        answer = self._ask({"text": command})
        _check(answer["rc"], answer["error"], what)
        return answer["output"]

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


_shared = None
_shared_lock = threading.Lock()


def needs_worker() -> bool:
    """True on hybrid hosts: cgroup2 is not mounted at /sys/fs/cgroup."""
    return os.path.realpath(cgroup.cgroup2_mount()) != CGROUP_DIR


def runner():
    """The process-wide runner (created on first use, closed at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Worker() if needs_worker() else InProcess()
            atexit.register(_shared.close)
        return _shared


def reset() -> None:
    """Close the shared runner (e.g. after moving to another network namespace)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
            _shared = None
