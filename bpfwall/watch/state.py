"""The watcher's memory across restarts: which units it loaded, from which definition.

bpffs holds only programs and maps (and refuses names with dots), so the
fingerprint of each unit's policy entry and the ids of the programs loaded for
it live in a small JSON file under /run (tmpfs: gone at reboot, exactly when
program ids stop meaning anything). One file per pin root, locked while a
watcher runs, so two watchers never manage the same pins.

A unit is reused untouched on restart only if its fingerprint is unchanged and
the programs pinned now are the ones recorded, so a `bpfwall load` made by hand
in between is noticed.
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
    programs: dict[str, int] = field(default_factory=dict)  # direction → program id


class State:
    def __init__(self, state_dir: str, pin_root: str):
        self.pin_root = os.path.realpath(pin_root)
        digest = hashlib.sha256(self.pin_root.encode()).hexdigest()[:16]
        self.path = os.path.join(state_dir, f"watch-{digest}.json")
        self.units: dict[str, Owned] = {}
        self._lock_fd = -1

    def lock(self) -> None:
        """Hold the state file's lock for as long as this process runs."""
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise WatchError(f"cannot open the watcher state {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise WatchError(f"another bpfwall watch manages the pin root {self.pin_root} "
                                 f"(it holds {self.path}.lock)") from None
            raise WatchError(f"cannot lock {self.path}.lock: {e.strerror}") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def read(self) -> None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            self.units = {}
            return
        except (OSError, ValueError):
            self.units = {}  # unreadable: every unit is checked against its pins again
            return
        if data.get("pin_root") != self.pin_root:
            self.units = {}
            return
        self.units = {name: Owned(u["fingerprint"], u.get("backend", "bpf"), dict(u.get("programs", {})))
                      for name, u in data.get("units", {}).items()}

    def write(self) -> None:
        data = {"pin_root": self.pin_root,
                "units": {name: {"fingerprint": o.fingerprint, "backend": o.backend, "programs": o.programs}
                          for name, o in sorted(self.units.items())}}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)  # readers see the old file or the new, never half of one
