"""The watcher's memory across restarts: which units it loaded, from which definition.

bpffs holds only programs and maps (and refuses names with dots), so the
fingerprint of each unit's policy entry and the ids of the programs loaded for
it live in a small JSON file under /run (tmpfs: gone at reboot, exactly when
program ids stop meaning anything). One file per pin root, locked while a
watcher runs, so two watchers never manage the same pins. The directory is
root's and 0700, and files in it are opened through its fd without following
symlinks (kernel/safefs.py).

A unit is reused untouched on restart only if its fingerprint is unchanged and
the programs pinned now are the ones recorded (nft: the table's state still
holds the same expressions), so a `bpfwall load` made by hand in between is
noticed. A unit whose entry moved to the other backend (or another nft table)
is "retired": remembered until its old filters are removed, even across a crash.

The file is only a memory: a damaged or malformed one is read as no memory
(with a warning) — every unit is then checked against its pins and reloaded if
they differ — rather than stopping the watcher, which would leave new cgroups
unfiltered. A file that cannot be written (a full disk) is kept in memory and
written later (daemon.py retries): the filters come first.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from .. import unitkey
from ..backends import NAMES as BACKENDS
from ..errors import Error
from ..nft.names import TABLE_RE
from ..kernel.safefs import PrivateDir

DEFAULT_STATE_DIR = "/run/bpfwall"
DIRECTIONS = ("ingress", "egress")
_FINGERPRINT = re.compile(r"[0-9a-f]{1,128}")


class WatchError(Error):
    """The watcher cannot start or go on; one line for the user."""


class Malformed(ValueError):
    """The state file is not what a watcher writes; str() says where."""


@dataclass
class Owned:
    fingerprint: str
    backend: str
    programs: dict[str, int] = field(default_factory=dict)  # direction → program id (bpf)
    table: str | None = None  # the nft table (nft)

    def as_json(self) -> dict:
        out = {"fingerprint": self.fingerprint, "backend": self.backend, "programs": self.programs}
        if self.table is not None:
            out["table"] = self.table
        return out

    @classmethod
    def from_json(cls, u, where: str) -> "Owned":
        """The record `u`, checked field by field (Malformed names the first bad one)."""
        if not isinstance(u, dict) or not {"fingerprint", "backend", "programs"} <= set(u) \
                or not set(u) <= {"fingerprint", "backend", "programs", "table"}:
            raise Malformed(f"{where}: expected fingerprint, backend, programs (and table)")
        if not isinstance(u["fingerprint"], str) or not _FINGERPRINT.fullmatch(u["fingerprint"]):
            raise Malformed(f"{where}.fingerprint: expected a hex digest")
        if u["backend"] not in BACKENDS:
            raise Malformed(f"{where}.backend: expected bpf or nft")
        programs = u["programs"]
        if not isinstance(programs, dict) or not all(
                d in DIRECTIONS and type(pid) is int and 0 < pid < 2**32 for d, pid in programs.items()):
            raise Malformed(f"{where}.programs: expected program ids by direction")
        table = u.get("table")
        if table is not None and (not isinstance(table, str) or not TABLE_RE.fullmatch(table)):
            raise Malformed(f"{where}.table: expected an nft table name")
        return cls(u["fingerprint"], u["backend"], dict(programs), table)


class State:
    def __init__(self, state_dir: str, pin_root: str):
        self.dir = state_dir
        self.pin_root = os.path.realpath(pin_root)
        digest = hashlib.sha256(self.pin_root.encode()).hexdigest()[:16]
        self.name = f"watch-{digest}.json"
        self.path = os.path.join(state_dir, self.name)
        self.units: dict[str, Owned] = {}
        self.retired: dict[str, Owned] = {}  # filters still to remove: the entry now lives elsewhere
        self.unsaved: str | None = None  # why the last write failed (retried by retry_write)
        self._lock_fds: list[int] = []

    def _open(self) -> PrivateDir:
        return PrivateDir(self.dir, "the watcher state directory", WatchError)

    def lock(self) -> None:
        """Hold the state file's lock for as long as this process runs."""
        self._lock(self.name + ".lock", f"the pin root {self.pin_root}")
        with self._open() as d:
            d.remove_temps(self.name)  # what a watcher killed mid-write left

    def lock_table(self, table: str) -> None:
        """Also hold the nft table's watcher lock: one watcher per table, as per pin root."""
        self._lock(f"watch-nft-{table}.lock", f"the nft table {table}")

    def _lock(self, name: str, what: str) -> None:
        with self._open() as d:
            fd = d.open_lock(name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            path = os.path.join(self.dir, name)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WatchError(f"another bpfwall watch manages {what} (it holds {path})") from None
            raise WatchError(f"cannot lock {path}: {e.strerror}") from None
        self._lock_fds.append(fd)

    def unlock(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    def read(self) -> str | None:
        """Read the file; a warning (one line) when it was unusable and is taken as empty."""
        self.units, self.retired = {}, {}
        with self._open() as d:
            try:
                data = d.read(self.name)
            except WatchError as e:
                return f"{e}; starting without it"
        if data is None:
            return None
        try:
            units, retired = self.parse(data)
        except Malformed as e:
            return (f"the watcher state {self.path} is unusable ({e}): every unit is checked against "
                    "its pins and reloaded if they differ; it is rewritten now")
        if units is not None:
            self.units, self.retired = units, retired
        return None

    def parse(self, data: bytes) -> tuple[dict | None, dict | None]:
        """(units, retired) from the file's contents; (None, None) for another pin root's."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise Malformed("not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("pin_root"), str) \
                or not set(doc) <= {"pin_root", "units", "retired"}:
            raise Malformed("expected an object with pin_root, units and retired")
        if doc["pin_root"] != self.pin_root:
            return None, None
        out = []
        for key in ("units", "retired"):
            records = doc.get(key, {})
            if not isinstance(records, dict):
                raise Malformed(f"{key}: expected an object")
            for name in records:
                try:
                    unitkey.validate(name)
                except unitkey.UnitNameError:
                    raise Malformed(f"{key}: {name!r} is not a unit name") from None
            out.append({name: Owned.from_json(u, f"{key}.{name}") for name, u in records.items()})
        return out[0], out[1]

    def encode(self) -> bytes:
        data = {"pin_root": self.pin_root,
                "units": {name: o.as_json() for name, o in sorted(self.units.items())}}
        if self.retired:
            data["retired"] = {name: o.as_json() for name, o in sorted(self.retired.items())}
        return json.dumps(data, indent=1, sort_keys=True).encode()

    def write(self) -> None:
        """Replace the file atomically; WatchError (one line) when it cannot be written, and
        `unsaved` says why until a later write succeeds."""
        try:
            with self._open() as d:
                d.replace(self.name, self.encode())
        except WatchError as e:
            self.unsaved = str(e)
            raise
        self.unsaved = None
