"""The nft backend behind the Backend interface (base.py): units in one nft table. The work
is done by the functions of nft.py; this class holds the table's name, and the watcher's
half: units as the watcher holds them (`NftUnit`, no fds to keep) and the index of which
cgroups carry them.

The table's state file (bpfwall/nft/state.py) is the truth the nft backend renders from:
`load` renders a unit (or replaces it in place, one transaction), `attach` adds the
cgroup's element to its level's verdict map, `detach` removes it — also for a cgroup that
no longer exists, whose element nft can only name by the id it stored.

The watcher reuses an nft unit on restart (nothing re-rendered) when its record has the
entry's fingerprint and the table's state still holds the unit with the same expressions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..kernel import cgroup
from ..nft.errors import NftError
from ..nft.runner import needs_worker, runner
from ..nft.state import StateFile
from ..watch.state import Owned, WatchError
from . import nft
from .base import Loaded
from .nft_events import NftEvents

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
    strict: bool = False  # a strict slice default: the cgroups below it are held until classified
    backend = "nft"
    exclusive = True  # the nft backend filters a cgroup with one unit
    needs_cleanup = True  # a removed cgroup's map element stays until it is dropped
    runs_below = False  # the dispatch chain runs the nearest level's filter only

    @property
    def guards(self) -> bool:
        """Only a strict slice default needs the watcher's classification here: the dispatch
        already judges per level (deepest first); a strict one holds what is not classified."""
        return self.strict

    def classify(self, cgroup_id: int, below, path: str) -> bool:
        """The descendant at `path` is classified (whatever a deeper filter judges of it): no
        longer held. nft names cgroups by path, so the watcher gives it."""
        return nft.classify(self.table, self.name, path)

    def unclassify(self, cgroup_id: int) -> bool:
        return nft.unclassify(self.table, self.name, cgroup_id)

    def keep_classified(self, classified: dict) -> list[int]:
        """Keep exactly these ({cgroup id: path}) and the unit's slices with their ancestors."""
        return nft.keep_known(self.table, self.name, dict(classified))

    def attach(self, path: str) -> list[str]:
        """Add the cgroup's element (a no-op when it has it); the directions newly filtered."""
        return [d for d, new in nft.attach(self.table, self.name, path).items() if new]

    def detach(self, path: str, directions=None) -> list[str]:
        """Remove the cgroup's element (the nft backend filters a cgroup in both directions or none)."""
        return [d for d, was in nft.detach(self.table, self.name, path).items() if was]

    def gone(self, path: str) -> bool:
        """The cgroup at `path` was removed: drop the element of the removed one. If a new
        cgroup took its path and carries the unit already, its attach dropped the old record."""
        u = StateFile(self.table).load().units.get(self.name)
        rel = os.path.relpath(path, cgroup.cgroup2_mount())
        mine = [a for a in u.attached if a.cgroup == rel] if u is not None else []
        if not mine or any(nft.alive(a) for a in mine):
            return False
        nft.detach(self.table, self.name, path)
        return True

    def intact(self) -> bool:
        return True  # the table is kept in place by the guard (nft/guard.py), not by the handle

    def close(self) -> None:
        pass


class NftBackend:
    """Units in the nft table `table` (inet family)."""

    name = "nft"
    parallel = False  # one nft transaction at a time, from the watcher's thread

    def __init__(self, table: str | None = None, log_group: int | None = None):
        self.table = table or nft.default_table()
        self.log_group = nft.check_log_group(log_group)  # None: the table's (2120 for a new one)
        self._index: dict[str, list[tuple[str, str]]] = {}  # cgroup path → [(unit, direction)]
        self._runnable = False
        self._claimed = False

    # -- the commands --------------------------------------------------------------------------

    def load(self, unit: str, program, params=None, sets=None, mode=None, log=None) -> Loaded:
        log = log or {}
        r = nft.load(self.table, unit, program, params, sets, mode, log_group=self.log_group,
                     log_rate=log.get("log_rate"), log_burst=log.get("log_burst"))
        places = {d: f"table inet {r.table} chain {c}" for d, c in r.chains.items()}
        return Loaded(unit, places, r.replaced, r.attached, r.detached, {"table": r.table, "chains": r.chains})

    def unload(self, unit: str) -> list:
        return nft.unload(self.table, unit)

    def attach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        return nft.attach(self.table, unit, cgroup_path)

    def detach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        return nft.detach(self.table, unit, cgroup_path)

    def stats(self, unit: str) -> dict:
        return nft.stats(self.table, unit)

    def summary(self) -> list[dict]:
        return nft.summary(self.table)

    def set_values(self, unit: str, changes: list) -> list[str]:
        # ("log", name, n) is how `set` says log_rate=/log_burst=; nft.set_values takes (name, n)
        changes = [(c[1], c[2]) if c[0] == "log" else c for c in changes]
        return nft.set_values(self.table, unit, changes)

    def events(self, units: list[str] | None = None, state_dir: str | None = None) -> NftEvents:
        """The table's drop events over its nflog group (the group the table's state names)."""
        return NftEvents(self.table, units, state_dir)

    def explain(self, checked, direction: str | None = None) -> tuple[dict, str]:
        """Both directions' chains as nft text (the JSON always has both)."""
        rules = {d: nft.explain(checked, d) for d in nft.DIRECTIONS}
        text = rules[direction] if direction else "\n".join(f"# {d}\n{r}" for d, r in rules.items())
        return {"expression": checked.text, "nft": rules}, text

    def built_as_guard(self, unit: str) -> bool:
        return False  # the dispatch runs one level's filter: no unit entry is ever made a guard here

    def restore(self) -> dict:
        """Rebuild the table from its state file (`nft-restore`)."""
        return nft.restore(self.table)

    # -- the watcher -----------------------------------------------------------------------------

    def check_runnable(self) -> None:
        """Make sure nft can run here before anything is loaded: on hybrid hosts that starts
        the mount-namespace worker, which needs privileges a bpf-only setup lacks."""
        if self._runnable:
            return
        try:
            runner().json([{"list": {"tables": {"family": "inet"}}}], "listing tables")
        except NftError as e:
            raise WatchError(worker_hint(e) if needs_worker() else str(e)) from None
        self._runnable = True

    def claim(self, state) -> None:
        """nft must run here, and one watcher alone manages the table."""
        self.check_runnable()
        if not self._claimed:
            state.lock_table(self.table)
            self._claimed = True

    def guard(self, log):
        """Restores the table within milliseconds after `nft flush ruleset` or its deletion (the
        one nft guard, nft/guard.py, driven by the watcher's poll loop)."""
        from ..nft.guard import Guard

        table = self.table

        def restored(r) -> None:
            log.warning("restore", r.message(), table=r.table, units=r.units, attachments=r.attachments,
                        took_ms=f"{r.took_ms:.1f}")

        def not_restored(message: str) -> None:
            log.error("restore", f"table inet {table}: {message}", table=table)
        return Guard(table, on_restore=restored, on_error=not_restored)

    def prepare_many(self, entries) -> None:
        for entry in entries:
            self.prepare(entry)

    def prepare(self, entry) -> None:
        """Lower every direction now, so an entry nft cannot express stops a reload before any change."""
        program = entry.program()
        for direction in nft.DIRECTIONS:
            checked = getattr(program, direction)
            if checked is not None:
                nft.explain(checked, direction, entry.name, entry.params, entry.sets, entry.mode)

    def ensure(self, entry, owned: Owned | None) -> tuple[NftUnit, str]:
        """The unit rendered in the table: (handle, "reused" | "loaded")."""
        self.check_runnable()
        program = entry.program()
        fingerprint = entry.fingerprint()
        have = StateFile(self.table).load().units.get(entry.name)
        same = have is not None and owned is not None and owned.fingerprint == fingerprint \
            and owned.table == self.table and have.strict == entry.strict \
            and have.ingress == (program.ingress.text if program.ingress else None) \
            and have.egress == (program.egress.text if program.egress else None)
        if not same:
            nft.load(self.table, entry.name, program, entry.params, entry.sets, entry.mode,
                     log_rate=getattr(entry, "log_rate", None), log_burst=getattr(entry, "log_burst", None),
                     log_group=self.log_group, strict=entry.strict)
        directions = [d for d in nft.DIRECTIONS if getattr(program, d) is not None]
        return NftUnit(entry.name, fingerprint, self.table, directions, entry.strict), "reused" if same else "loaded"

    def owned(self, handle: NftUnit) -> Owned:
        return Owned(handle.fingerprint, self.name, {}, self.table)

    def holds(self, owned: Owned) -> bool:
        return owned.table == self.table

    def where(self, owned: Owned) -> str:
        return f"nft table {owned.table}"

    def release(self, unit: str, owned: Owned | None = None) -> list:
        """Remove the unit and its elements; [] when the table holds no such unit."""
        table = owned.table if owned is not None and owned.table else self.table
        if unit not in nft.units(table):
            return []
        return nft.unload(table, unit)

    def refresh(self, handles: dict) -> list[tuple[str, str]]:
        """Index the live attachments of our units (`handles`: name → unit), and drop the
        elements of cgroups that vanished while nobody watched; the (unit, cgroup path) dropped."""
        mount = cgroup.cgroup2_mount()
        self._index, dead = {}, []
        for unit, u in StateFile(self.table).load().units.items():
            if unit not in handles or handles[unit].backend != self.name:
                continue
            for a in u.attached:
                path = os.path.join(mount, a.cgroup)
                if nft.alive(a, mount):
                    self._index.setdefault(path, []).extend((unit, d) for d in a.directions)
                else:
                    dead.append((unit, path))
        for unit, path in dead:
            nft.detach(self.table, unit, path)
        return dead

    def ours_on(self, path: str) -> list[tuple[str, str]]:
        """(unit, direction) of ours on this cgroup, as indexed by the last refresh()."""
        return self._index.get(path, [])

    # The table's state file: see nft/state.py for how a state the disk refused waits.
    def defer_records(self, on: bool) -> None:
        StateFile.record_later = on

    def unrecorded(self) -> dict[str, str]:
        return StateFile.unrecorded()

    def retry_records(self) -> None:
        StateFile.retry_unrecorded()

    def lost_records(self) -> list[str]:
        return StateFile.take_lost()
