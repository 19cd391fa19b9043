"""The watcher's memory across restarts: which units it loaded, from which definition.

bpffs holds only programs and maps (and refuses names with dots), so the
fingerprint of each unit's policy entry and the ids of the programs loaded for
it live in a small JSON file under /run (tmpfs: gone at reboot, exactly when
program ids stop meaning anything). One file per pin root, locked while a
watcher runs, so two watchers never manage the same pins.

A unit is reused untouched on restart only if its fingerprint is unchanged and
the programs pinned now are the ones recorded (nft: the table's state still
holds the same expressions), so a `bpfwall load` made by hand in between is
noticed. A unit whose entry moved to the other backend (or another nft table)
is "retired": remembered until its old filters are removed, even across a crash.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field

from ..errors import UserError

DEFAULT_STATE_DIR = "/run/bpfwall"


class WatchError(UserError):
    """The watcher cannot start or go on; one line for the user."""


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
    def from_json(cls, u: dict) -> "Owned":
        return cls(u["fingerprint"], u.get("backend", "bpf"), dict(u.get("programs", {})), u.get("table"))


class State:
    def __init__(self, state_dir: str, pin_root: str):
        self.pin_root = os.path.realpath(pin_root)
        digest = hashlib.sha256(self.pin_root.encode()).hexdigest()[:16]
        self.path = os.path.join(state_dir, f"watch-{digest}.json")
        self.units: dict[str, Owned] = {}
        self.retired: dict[str, Owned] = {}  # filters still to remove: the entry now lives elsewhere
        self._lock_fds: list[int] = []

    def lock(self) -> None:
        """Hold the state file's lock for as long as this process runs."""
        self._lock(self.path + ".lock", f"the pin root {self.pin_root}")

    def lock_table(self, table: str) -> None:
        """Also hold the nft table's watcher lock: one watcher per table, as per pin root."""
        self._lock(os.path.join(os.path.dirname(self.path), f"watch-nft-{table}.lock"), f"the nft table {table}")

    def _lock(self, path: str, what: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise WatchError(f"cannot open the watcher state {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WatchError(f"another bpfwall watch manages {what} (it holds {path})") from None
            raise WatchError(f"cannot lock {path}: {e.strerror}") from None
        self._lock_fds.append(fd)

    def unlock(self) -> None:
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    def read(self) -> None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            self.units, self.retired = {}, {}
            return
        except (OSError, ValueError):
            self.units, self.retired = {}, {}  # unreadable: every unit is checked against its pins again
            return
        if data.get("pin_root") != self.pin_root:
            self.units, self.retired = {}, {}
            return
        self.units = {name: Owned.from_json(u) for name, u in data.get("units", {}).items()}
        self.retired = {name: Owned.from_json(u) for name, u in data.get("retired", {}).items()}

    def write(self) -> None:
        data = {"pin_root": self.pin_root,
                "units": {name: o.as_json() for name, o in sorted(self.units.items())}}
        if self.retired:
            data["retired"] = {name: o.as_json() for name, o in sorted(self.retired.items())}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # readers see the old file or the new, never half of one
