"""What a `bpfwall run` writes down so that what it leaves behind when it is killed can be found.

A run that dies by SIGKILL (OOM, `kill -9`, a crashed session) cannot clean up: its pins and
its cgroup would stay for good. So before it creates anything, it writes a record:

    <state dir>/run-<digest of the pin root>-<unit key>      (state dir: $BPFWALL_STATE_DIR
                                                               or /run/bpfwall, as the watcher's)

holding one JSON object: the unit, the pin root, the cgroup bpfwall makes for the command (null
when systemd makes the scope), the supervising process's pid and a random token, which the run
also writes into its unit's `meta` map. The token is what tells the run's pins from a unit of
the same name that someone loaded by hand later.

The run holds an exclusive flock on its record until it has cleaned up. The kernel drops the
lock when the process dies, however it dies, so "the lock can be taken" means "the run is dead",
with no pid reuse to fool us. A record appears complete and locked at once: it is written into
an unnamed file (O_TMPFILE), locked, and only then linked under its name.

Records are believed only in a directory whose whole path no one but root (or the euid) can
write (bpfwall/kernel/safefs.py), and only when they are regular files of ours, opened without
following symlinks: the leftovers are found by what bpfwall wrote, never by a name a user could
create.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator

from . import unitkey
from .errors import Error
from .kernel import safefs

DEFAULT_STATE_DIR = "/run/bpfwall"
VERSION = 1
RULES = safefs.Rules(what="the state directory", file_what="the record",
                     elsewhere="set BPFWALL_STATE_DIR to a directory only root can write", needs_root=True)


class RecordError(Error):
    """The state directory or a record cannot be trusted or written; one line naming the path."""


@dataclass(frozen=True)
class Record:
    unit: str
    pin_root: str
    cgroup: str | None  # the cgroup the run made; None when systemd made the scope
    pid: int
    token: str
    version: int = VERSION

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Record":
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a version 1 record")
        types = {"unit": str, "pin_root": str, "cgroup": (str, type(None)), "pid": int, "token": str}
        if set(data) != {*types, "version"} or any(not isinstance(data[k], t) for k, t in types.items()):
            raise ValueError("unexpected fields")
        return cls(**data)


def state_dir() -> str:
    return os.environ.get("BPFWALL_STATE_DIR") or DEFAULT_STATE_DIR


def new_token() -> str:
    return uuid.uuid4().hex


def _prefix(pin_root: str) -> str:
    return f"run-{hashlib.sha256(os.path.realpath(pin_root).encode()).hexdigest()[:16]}-"


def record_name(pin_root: str, unit_key: str) -> str:
    return _prefix(pin_root) + unit_key


def open_state_dir(path: str, create: bool) -> int | None:
    """An O_DIRECTORY fd of the state directory, every component of its path checked
    (safefs), or None if it does not exist and create is False."""
    try:
        return safefs.open_dir(path, RULES, create=create)
    except safefs.PathError as e:
        if e.errno == errno.ENOENT and not create:
            return None
        raise RecordError(str(e)) from None


class HeldRecord:
    """This process's record, locked for as long as it lives (see the module doc)."""

    def __init__(self, dir_fd: int, fd: int, name: str, record: Record):
        self.dir_fd, self.fd, self.name, self.record = dir_fd, fd, name, record

    def release(self, remove: bool) -> None:
        """Close the record; remove it first when the run left nothing behind."""
        if remove:
            try:
                os.unlink(self.name, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        os.close(self.dir_fd)


def create(pin_root: str, unit_key: str, record: Record) -> HeldRecord:
    """Write, lock and link this run's record; RecordError if a record of that name exists
    (a live run of the same name, or a dead one whose command still runs)."""
    path = state_dir()
    dir_fd = open_state_dir(path, create=True)
    name = record_name(pin_root, unit_key)
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    except OSError as e:
        os.close(dir_fd)
        raise RecordError(f"cannot write a run record in {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, record.to_bytes())
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    except FileExistsError:
        os.close(fd)
        os.close(dir_fd)
        raise RecordError(f"{record.unit} is in use by another bpfwall run (its record is "
                          f"{os.path.join(path, name)}); choose another --name") from None
    except OSError as e:
        os.close(fd)
        os.close(dir_fd)
        raise RecordError(f"cannot write the run record {os.path.join(path, name)}: {e.strerror}") from None
    return HeldRecord(dir_fd, fd, name, record)


@dataclass
class DeadRun:
    """A record whose run is gone; we hold its lock until release()."""
    held: HeldRecord | None  # None: the record itself is unreadable (see problem)
    path: str
    problem: str | None = None

    @property
    def record(self) -> Record:
        return self.held.record


def dead_runs(pin_root: str) -> Iterator[DeadRun]:
    """The records of this pin root's runs that are dead, each locked by us while yielded to
    the caller (who releases it). Records of live runs are skipped."""
    path = state_dir()
    dir_fd = open_state_dir(path, create=False)
    if dir_fd is None:
        return
    try:
        names = sorted(n for n in os.listdir(dir_fd) if n.startswith(_prefix(pin_root)))
        for name in names:
            dead = _take_if_dead(dir_fd, path, name, pin_root)
            if dead is not None:
                yield dead
    finally:
        os.close(dir_fd)


def _take_if_dead(dir_fd: int, path: str, name: str, pin_root: str) -> DeadRun | None:
    full = os.path.join(path, name)
    try:
        fd = safefs.open_file(dir_fd, name, full, RULES)
    except safefs.UnsafePath as e:
        return DeadRun(None, full, f"it {e.problem}")
    except safefs.PathError as e:
        if e.errno == errno.ENOENT:
            return None  # its run finished meanwhile
        return DeadRun(None, full, f"cannot open it: {os.strerror(e.errno)}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None  # its bpfwall is alive and holds it
    if os.fstat(fd).st_nlink == 0:  # its run removed it between our open and our lock
        os.close(fd)
        return None
    try:
        record = Record.from_bytes(os.read(fd, 1 << 16))
        if os.path.realpath(record.pin_root) != os.path.realpath(pin_root):
            raise ValueError(f"it names the pin root {record.pin_root}")
        if name != record_name(pin_root, unitkey.encode(record.unit)):
            raise ValueError(f"it names the unit {record.unit}")
    except ValueError as e:
        os.close(fd)
        return DeadRun(None, full, f"it is not a bpfwall run record ({e})")
    return DeadRun(HeldRecord(os.dup(dir_fd), fd, name, record), full)
