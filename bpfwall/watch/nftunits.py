"""Policy entries with backend "nft", as the watcher holds them: units in one nft table.

The table's state file (bpfwall/nft/state.py) is the truth the nft backend
renders from; the watcher only calls the backend: `load` renders a unit (or
replaces it in place, one transaction), `attach` adds the cgroup's element to
its level's verdict map, `detach` removes it — also for a cgroup that no
longer exists, whose element nft can only name by the id it stored.

An nft unit is reused on restart (nothing re-rendered) when the watcher's
record has the entry's fingerprint and the table's state still holds the
unit with the same expressions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..backends import nft
from ..kernel import cgroup
from ..nft.errors import NftError
from ..nft.runner import needs_worker, runner
from ..nft.state import StateFile
from .state import Owned, WatchError

# Where `make install` puts it (PREFIX /usr/local), and where it is in the source tree.
DROPIN = "/usr/local/share/doc/bpfwall/examples/units/bpfwall.service.d/nft-hybrid.conf"
DROPIN_SOURCE = "units/examples/bpfwall.service.d/nft-hybrid.conf"
DROPIN_DIR = "/etc/systemd/system/bpfwall.service.d/"


def worker_hint(error: Exception) -> str:
    """The one-line error when nft cannot run here, saying which drop-in gives it what it needs."""
    return (f"{error}; nft entries on a hybrid-cgroup host need CAP_SYS_ADMIN and the @mount system calls "
            f"(the nft worker mounts cgroup2 in a mount namespace of its own): under systemd, copy {DROPIN} "
            f"(in the source tree: {DROPIN_SOURCE}) to {DROPIN_DIR} and run systemctl daemon-reload; systemctl restart bpfwall")


@dataclass
class NftUnit:
    """One unit in the table: what the daemon attaches and detaches (no fds to keep)."""
    name: str
    fingerprint: str
    table: str
    directions: list
    backend = "nft"

    @property
    def ids(self) -> dict:
        return {}  # no programs: nothing of ours shows in BPF_PROG_QUERY

    def attach(self, path: str) -> list[str]:
        """Add the cgroup's element (a no-op when it has it); the directions newly filtered."""
        return [d for d, new in nft.attach(self.table, self.name, path).items() if new]

    def detach(self, path: str, directions=None) -> list[str]:
        """Remove the cgroup's element (the nft backend filters a cgroup in both directions or none)."""
        return [d for d, was in nft.detach(self.table, self.name, path).items() if was]

    def gone(self, path: str) -> bool:
        """The cgroup at `path` was removed: drop the element of the removed one. If a new
        cgroup took its path and carries the unit already, its attach dropped the old record."""
        records = _records(self.table).get(self.name, [])
        rel = _rel(path)
        mine = [a for a in records if a["cgroup"] == rel]
        if not mine or any(_alive(a) for a in mine):
            return False
        nft.detach(self.table, self.name, path)
        return True

    def close(self) -> None:
        pass


def _records(table: str) -> dict[str, list]:
    """{unit: attachment records} from the table's state file (read without its lock: it is
    replaced atomically, so this sees one whole version)."""
    return {name: u["attached"] for name, u in StateFile(table).load()["units"].items()}


def _rel(path: str) -> str:
    return os.path.relpath(path, cgroup.cgroup2_mount())


def _alive(record: dict) -> bool:
    try:
        return os.stat(os.path.join(cgroup.cgroup2_mount(), record["cgroup"])).st_ino == record["id"]
    except OSError:
        return False


class NftUnits:
    """Policy entries with backend "nft", in table `table`."""

    backend = "nft"
    parallel = False  # one nft transaction at a time, from the watcher's thread

    def __init__(self, table: str):
        self.table = table
        self._index: dict[str, list[tuple[str, str]]] = {}  # cgroup path → [(unit, direction)]
        self._checked = False

    def check_runnable(self) -> None:
        """Make sure nft can run here before anything is loaded: on hybrid hosts that starts
        the mount-namespace worker, which needs privileges a bpf-only setup lacks."""
        if self._checked:
            return
        try:
            runner().json([{"list": {"tables": {"family": "inet"}}}], "listing tables")
        except NftError as e:
            raise WatchError(worker_hint(e) if needs_worker() else str(e)) from None
        self._checked = True

    def prepare(self, entry) -> None:
        """Lower every direction now, so an entry nft cannot express stops a reload before any change."""
        program = entry.program()
        for direction in ("ingress", "egress"):
            checked = getattr(program, direction)
            if checked is not None:
                nft.explain(checked, direction, entry.name, entry.params, entry.sets, entry.mode)

    def prepare_many(self, entries) -> None:
        for entry in entries:
            self.prepare(entry)

    def ensure(self, entry, owned: Owned | None) -> tuple[NftUnit, str]:
        """The unit rendered in the table: ("reused" | "loaded")."""
        self.check_runnable()
        program = entry.program()
        fingerprint = entry.fingerprint()
        have = StateFile(self.table).load()["units"].get(entry.name)
        same = have is not None and owned is not None and owned.fingerprint == fingerprint \
            and owned.table == self.table \
            and have.get("ingress") == (program.ingress.text if program.ingress else None) \
            and have.get("egress") == (program.egress.text if program.egress else None)
        if not same:
            nft.load(self.table, entry.name, program, entry.params, entry.sets, entry.mode)
        directions = [d for d in ("ingress", "egress") if getattr(program, d) is not None]
        return NftUnit(entry.name, fingerprint, self.table, directions), "reused" if same else "loaded"

    def owned(self, handle: NftUnit) -> Owned:
        return Owned(handle.fingerprint, self.backend, {}, self.table)

    def unload(self, name: str, owned: Owned | None = None) -> list:
        """Remove the unit and its elements; [] when the table holds no such unit."""
        table = owned.table if owned is not None and owned.table else self.table
        if name not in nft.units(table):
            return []
        return nft.unload(table, name)

    # -- what a reconcile needs -------------------------------------------------

    def refresh(self, handles: dict) -> list[tuple[str, str]]:
        """Index the live attachments of our units (`handles`: name → unit), and drop the
        elements of cgroups that vanished while nobody watched; the (unit, cgroup path) dropped."""
        mount = cgroup.cgroup2_mount()
        self._index, dead = {}, []
        for unit, records in _records(self.table).items():
            if unit not in handles or handles[unit].backend != self.backend:
                continue
            for a in records:
                path = os.path.join(mount, a["cgroup"])
                if _alive(a):
                    self._index.setdefault(path, []).extend((unit, d) for d in a["directions"])
                else:
                    dead.append((unit, path))
        for unit, path in dead:
            nft.detach(self.table, unit, path)
        return dead

    def ours_on(self, path: str) -> list[tuple[str, str]]:
        """(unit, direction) of ours on this cgroup, as indexed by the last refresh()."""
        return self._index.get(path, [])
