"""The policy's units as the watcher holds them: loaded, pinned, and open for attaching.

`UnitHandle` keeps one fd per program, so attaching on a new cgroup costs a
query and an attach — no pins reopened, no meta parsed, no tree walked.
`BpfUnits.ensure` decides between reusing what is pinned (unchanged
definition: a watcher restart must not swap programs) and loading (which swaps
new programs in place on every attachment, BPF_F_REPLACE, no gap).
"""
from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field

from ..backends import bpf
from ..build import build, build_many
from ..kernel import cgroup, loader, maps, progs
from ..kernel.errors import KernelError
from ..lower.c import set_map
from .state import Owned


@dataclass
class UnitHandle:
    """One bpf unit: its pinned programs, open."""
    name: str
    fingerprint: str
    pin_root: str = ""
    progs: dict[str, int] = field(default_factory=dict)  # direction → fd
    ids: dict[str, int] = field(default_factory=dict)    # direction → program id
    inodes: dict[str, int] = field(default_factory=dict)  # direction → the pin's inode
    backend = "bpf"

    @property
    def directions(self) -> list[str]:
        return list(self.progs)

    @property
    def names(self) -> dict[str, str]:
        return {d: bpf.program_name(self.pin_root, self.name, d) for d in bpf.DIRECTIONS}

    @classmethod
    def open(cls, pin_root: str, name: str, fingerprint: str) -> "UnitHandle":
        self = cls(name, fingerprint, pin_root)
        try:
            with bpf.locked_unit_dir(pin_root, name) as d:
                for direction in bpf.DIRECTIONS:
                    if (st := d.lstat(direction)) is not None:
                        fd = d.get(direction)
                        self.progs[direction] = fd
                        self.ids[direction] = progs.prog_info(fd).id
                        self.inodes[direction] = st.st_ino
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for fd in self.progs.values():
            os.close(fd)
        self.progs.clear()

    def attach(self, path: str) -> list[str]:
        """Attach every program to the cgroup (all or nothing); the directions newly attached.
        Fails (BackendError) when the unit's pins are gone: nothing runs that no pin names."""
        with bpf.locked_unit_dir(self.pin_root, self.name) as d:
            return [dr for dr, new in bpf.attach_programs(d, path, self.progs, self.names).items() if new]

    def detach(self, path: str, directions=None) -> list[str]:
        with bpf.locked_unit_dir(self.pin_root, self.name) as d:
            return bpf.detach_programs(d, path, self.names, directions)

    def pins_intact(self) -> bool:
        """Whether the pins are still the ones this handle opened (a cheap stat per pin: a new
        pin is a new inode), so pins removed or replaced behind the watcher are noticed."""
        base = bpf.unit_dir(self.pin_root, self.name)
        for direction in bpf.DIRECTIONS:
            try:
                ino = os.lstat(os.path.join(base, direction)).st_ino
            except FileNotFoundError:
                ino = None
            if ino != self.inodes.get(direction):
                return False
        return os.path.lexists(os.path.join(base, "meta"))

    def gone(self, path: str) -> bool:
        """A removed cgroup: the kernel released its programs with it; nothing to do."""
        return False


def _program_ids(pin_root: str, name: str) -> dict[str, int]:
    out = {}
    try:
        with bpf.locked_unit_dir(pin_root, name) as d:
            for direction in bpf.DIRECTIONS:
                if d.exists(direction):
                    fd = d.get(direction)
                    try:
                        out[direction] = progs.prog_info(fd).id
                    finally:
                        os.close(fd)
    except bpf.BackendError:
        return {}
    return out


def _pins_match_entry(pin_root: str, entry, program) -> bool:
    """Whether the pinned unit is exactly what `entry` would load (expressions, params, sets, mode)."""
    try:
        unit = bpf.PinnedUnit.open(pin_root, entry.name)
    except (bpf.BackendError, KernelError):
        return False
    with unit:
        if unit.meta != program.meta():
            return False
        if set(unit.progs) != {d for d in bpf.DIRECTIONS if getattr(program, d) is not None}:
            return False
        if entry.mode is not None and unit.mode() != entry.mode:
            return False
        if unit.params() != {n: entry.params.get(n, 0) for n in program.params}:
            return False
        for name, elements in entry.sets.items():
            fd = unit.maps[set_map(name)]
            have = set(maps.map_keys(fd, maps.map_info(fd).key_size))
            if have != set(bpf.set_keys(program.sets[name], elements)):
                return False
    return True


class BpfUnits:
    """Policy entries with backend "bpf", pinned under one pin root."""

    backend = "bpf"
    parallel = True  # ensure() of several entries may run in threads at once (see apply_policy)

    def __init__(self, pin_root: str, cache=None):
        self.pin_root = pin_root
        self.cache = cache
        self._owner: dict[str, tuple[str, str]] = {}  # program name → (unit, direction)
        self._owner_ids: dict[int, tuple[str, str]] = {}  # program id → (unit, direction)

    def prepare(self, entry) -> None:
        """Compile now (cached), so a bad build stops a reload before anything changes."""
        self.prepare_many([entry])

    def prepare_many(self, entries) -> None:
        """prepare() every entry: all values checked, then all compiled, clang runs side by side."""
        programs = []
        for entry in entries:
            programs.append(entry.program())
            bpf.check_values(programs[-1], entry.params, entry.sets)
        build_many(programs, self.cache)

    def ensure(self, entry, owned: Owned | None) -> tuple[UnitHandle, str]:
        """The entry's programs, pinned and open: ("reused" | "adopted" | "loaded", handle)."""
        fingerprint = entry.fingerprint()
        pinned = self._loaded(entry.name)
        if pinned and owned is not None and owned.fingerprint == fingerprint \
                and _program_ids(self.pin_root, entry.name) == owned.programs:
            how = "reused"
        elif pinned and owned is None and _pins_match_entry(self.pin_root, entry, entry.program()):
            how = "adopted"  # state lost (or loaded by hand) but identical: keep it running
        else:
            program = entry.program()
            with (self._verified(entry, program) if not pinned else contextlib.nullcontext()) as early:
                bpf.load(self.pin_root, entry.name, program, entry.params, entry.sets, entry.mode, self.cache,
                         preloaded=early)
            how = "loaded"
        return UnitHandle.open(self.pin_root, entry.name, fingerprint), how

    def _verified(self, entry, program) -> loader.Loaded:
        """A new unit's programs loaded (verified) before bpf.load takes the pin root's lock, so
        the verifier works on several entries at once; the lock only covers pinning."""
        names = {bpf.PROG_SECTIONS[d]: bpf.program_name(self.pin_root, entry.name, d) for d in bpf.DIRECTIONS}
        return loader.load(build(program, self.cache), {}, names)

    def owned(self, handle: UnitHandle) -> Owned:
        return Owned(handle.fingerprint, self.backend, dict(handle.ids))

    def _loaded(self, name: str) -> bool:
        """Pinned completely (a directory without meta is a load cut short: load again)."""
        return os.path.lexists(os.path.join(bpf.unit_dir(self.pin_root, name), "meta"))

    def unload(self, name: str, owned: Owned | None = None) -> list:
        """Detach the unit everywhere and remove its pins; [] if it was gone already."""
        try:
            return bpf.unload(self.pin_root, name)
        except bpf.BackendError:
            if os.path.isdir(bpf.unit_dir(self.pin_root, name)):
                raise
            return []  # gone already, and nothing of it attached anywhere

    # -- what a reconcile needs -------------------------------------------------

    def refresh(self, handles: dict) -> list:
        """Index our units' program names (`handles`: name → UnitHandle): every program a
        unit ever loaded carries its name, so stale ones a crash left are found too. A removed
        cgroup takes its programs with it, so nothing is ever left to drop: []."""
        self._owner = {h.names[d]: (name, d) for name, h in handles.items() if h.backend == self.backend
                       for d in bpf.DIRECTIONS}
        # By id too: names are read by id, which needs CAP_SYS_ADMIN (bpfwall.service has not).
        self._owner_ids = {pid: (name, d) for name, h in handles.items() if h.backend == self.backend
                           for d, pid in h.ids.items()}
        return []

    def ours_on(self, path: str) -> list[tuple[str, str]]:
        """(unit, direction) of our units' programs attached to this cgroup itself (BPF_PROG_QUERY)."""
        out = []
        for direction in bpf.DIRECTIONS:
            _, ids = cgroup.query(path, direction)
            for pid in ids:
                owner = self._owner_ids.get(pid) or self._owner.get(bpf.name_of(pid))
                if owner is not None and owner[1] == direction:
                    out.append(owner)
        return sorted(set(out))


def is_gone(error: KernelError) -> bool:
    """A cgroup removed between the event and our attach: normal, not an error."""
    return error.errno == errno.ENOENT
