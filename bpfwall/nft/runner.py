"""Where libnftables runs: in this process on unified hosts, in a worker process with a
private mount namespace on hybrid ones (see worker.py). One interface for both:

    runner().json([...commands...])   one transaction of JSON commands; the output
    runner().text("add rule …")       one transaction in nft syntax (only for what the
                                       JSON parser of nft 1.0.6 cannot express)

A failed transaction changes nothing (the kernel aborts the whole batch) and
raises NftError with nft's first error line.

The worker must answer within REPLY_TIMEOUT seconds (the largest transaction, a
rebuild of 1,000 units, takes about a second): one that does not — stopped,
stuck — is killed by its PID and the request fails with one line; the next
request starts a new worker. A stuck worker never freezes the watcher.
(libnftables in this process cannot be interrupted; it only waits for the
kernel, which answers at once.)
"""
from __future__ import annotations

import atexit
import fcntl
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time

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


MISSING_NFTABLES = ("the nft backend needs the nftables Python module, which is not on PyPI: install it from "
                    "your distribution (Debian: apt-get install python3-nftables); in a virtualenv, create it "
                    "with --system-site-packages so it sees that module")


def require_nftables() -> None:
    """NftError naming the package when libnftables' Python module is missing (it is not on
    PyPI, so `pip install bpfwall` cannot bring it: see the `nft` extra in pyproject.toml)."""
    if importlib.util.find_spec("nftables") is None:
        raise NftError(MISSING_NFTABLES)


class InProcess:
    """libnftables in this process (cgroup2 is at /sys/fs/cgroup already)."""

    def __init__(self):
        require_nftables()
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


REPLY_TIMEOUT = 15.0  # seconds


class _Silent(Exception):
    """The worker did not answer in time."""


class Worker:
    """libnftables in `python -m bpfwall.nft.worker`, which sees cgroup2 at /sys/fs/cgroup."""

    def __init__(self, timeout: float = REPLY_TIMEOUT):
        self.lock = threading.Lock()
        self.proc = None
        self.timeout = timeout
        self._pending: list[bytes] = []  # what was read past the last answer's end

    def _start(self) -> None:
        require_nftables()  # the worker runs this interpreter: say so here, not as its traceback
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "bpfwall.nft.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, close_fds=True)
        self._pending = []
        fd = self.proc.stdin.fileno()  # writes wait in poll(2), bounded like reads, never in write(2)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        try:
            hello = self._readline(time.monotonic() + self.timeout)
        except _Silent:
            hello = None
        status = json.loads(hello) if hello else {"ready": False, "error": "the worker exited or did not answer"}
        if not status.get("ready"):
            self._kill()
            raise NftError(f"cannot start the nft worker (a mount namespace with cgroup2 at {CGROUP_DIR}): "
                           f"{status.get('error')}")

    def _write(self, data: bytes, deadline: float) -> None:
        fd, view = self.proc.stdin.fileno(), memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise _Silent()
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                continue

    def _readline(self, deadline: float) -> bytes | None:
        """The worker's next line (without its newline); None when it exited."""
        fd = self.proc.stdout.fileno()
        chunks = self._pending
        while not chunks or b"\n" not in chunks[-1]:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise _Silent()
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self._pending = []
                return None
            chunks.append(chunk)
        data = b"".join(chunks)
        line, _, rest = data.partition(b"\n")
        self._pending = [rest] if rest else []
        return line

    def _ask(self, request: dict, what: str) -> dict:
        data = (json.dumps(request) + "\n").encode()
        with self.lock:
            for _attempt in (1, 2):  # a worker that died is restarted once
                if self.proc is None or self.proc.poll() is not None:
                    self._kill()
                    self._start()
                deadline = time.monotonic() + self.timeout
                try:
                    self._write(data, deadline)
                    line = self._readline(deadline)
                except _Silent:
                    pid = self.proc.pid
                    self._kill()
                    raise NftError(f"the nft worker (pid {pid}) did not answer within {self.timeout:g} s while "
                                   f"{what}: it was killed (the change may or may not have been made); the next "
                                   "request starts a new one") from None
                except OSError:  # EPIPE: it died
                    line = None
                if line:
                    return json.loads(line)
                self._kill()
            raise NftError(f"the nft worker died while {what}")

    def json(self, commands: list, what: str = "the change"):
        answer = self._ask({"json": {"nftables": commands}}, what)
        _check(answer["rc"], answer["error"], what)
        return answer["output"]

    def text(self, command: str, what: str = "the change") -> str:
        answer = self._ask({"text": command}, what)
        _check(answer["rc"], answer["error"], what)
        return answer["output"]

    def _kill(self) -> None:
        """Stop the worker now, by its PID (SIGKILL works on a stopped process too)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()

    def close(self) -> None:
        """Let the worker finish (its stdin closes), killing it if it does not within 2 s."""
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
