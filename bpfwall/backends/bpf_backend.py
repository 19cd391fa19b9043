"""The bpf backend behind the Backend interface (base.py): cgroup_skb programs pinned under
one pin root. The work is done by the functions of bpf.py; this class holds the pin root
and the cache, and the watcher's half: open units (`UnitHandle`) and the index of which
programs are ours.

`UnitHandle` keeps one fd per program, so attaching on a new cgroup costs a query and an
attach — no pins reopened, no meta parsed, no tree walked. `ensure` decides between
reusing what is pinned (unchanged definition: a watcher restart must not swap programs)
and loading (which swaps new programs in place on every attachment: links updated, systemd's
replaced, no gap).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from ..build import UnitProgram, build, build_many
from ..compilers import describe as describe_compiler
from ..kernel import cgroup, loader, maps, progs
from ..errors import Error
from ..kernel.errors import KernelError
from ..lower.c import set_map
from ..watch.state import Owned
from . import bpf
from .base import Loaded
from .bpf_guard import GuardMap


@dataclass
class UnitHandle:
    """One bpf unit: its pinned programs, open."""
    name: str
    fingerprint: str
    pin_root: str = ""
    progs: dict[str, int] = field(default_factory=dict)  # direction → fd
    ids: dict[str, int] = field(default_factory=dict)    # direction → program id
    inodes: dict[str, int] = field(default_factory=dict)  # direction → the pin's inode
    guard: GuardMap | None = None  # a slice default's: which descendants a deeper filter judges
    backend = "bpf"
    exclusive = False  # programs of several units run side by side on a cgroup (ALLOW_MULTI)
    needs_cleanup = False  # a removed cgroup takes its programs with it
    runs_below = True  # the kernel runs every program from a socket's cgroup up to the root

    @property
    def guards(self) -> bool:
        """A slice default whose programs judge only what classify() leaves them (bpf: the guard map)."""
        return self.guard is not None

    def classify(self, cgroup_id: int, below, path: str) -> bool:
        """The descendant `cgroup_id` (at `path`) is classified: `below` are the directions a deeper
        filter judges (its packets pass this default untouched), the others this default judges."""
        return self.guard.classify(cgroup_id, below)

    def unclassify(self, cgroup_id: int) -> bool:
        return self.guard.forget(cgroup_id)

    def keep_classified(self, classified: dict) -> list[int]:
        """Keep exactly these ({cgroup id: path}); the ids dropped."""
        return self.guard.keep_only(classified)

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
                self.guard = GuardMap.open(d)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for fd in self.progs.values():
            os.close(fd)
        self.progs.clear()
        if self.guard is not None:
            self.guard.close()

    def attach(self, path: str) -> list[str]:
        """Attach every program to the cgroup (all or nothing); the directions newly attached.
        Fails (BackendError) when the unit's pins are gone: nothing runs that no pin names."""
        with bpf.locked_unit_dir(self.pin_root, self.name) as d:
            return [dr for dr, new in bpf.attach_programs(d, path, self.progs, self.names).items() if new]

    def detach(self, path: str, directions=None) -> list[str]:
        with bpf.locked_unit_dir(self.pin_root, self.name) as d:
            return bpf.detach_programs(d, path, self.names, directions)

    def intact(self) -> bool:
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
        want = program.meta()
        if program.compiler == "auto":  # whichever built it
            want["compiler"] = unit.meta["compiler"]
        if unit.meta != want:
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


class BpfBackend:
    """Units pinned under `pin_root`; objects compiled through the cache at `cache`, by
    `compiler` when given (--compiler, $BPFWALL_COMPILER), else as each policy entry says."""

    name = "bpf"
    parallel = True  # ensure() of several entries may run in threads at once (see apply_policy)

    def __init__(self, pin_root: str = bpf.DEFAULT_PIN_ROOT, cache=None, compiler: str | None = None):
        self.pin_root = pin_root
        self.cache = cache
        self.compiler = compiler
        self._owner: dict[str, tuple[str, str]] = {}  # program name → (unit, direction)
        self._owner_ids: dict[int, tuple[str, str]] = {}  # program id → (unit, direction)

    # -- the commands --------------------------------------------------------------------------

    def load(self, unit: str, program, params=None, sets=None, mode=None, log=None) -> Loaded:
        r = bpf.load(self.pin_root, unit, program, params, sets, mode, self.cache, log=log)
        places = {d: f"{r.path}/{d}" for d in bpf.DIRECTIONS if getattr(program, d) is not None}
        return Loaded(unit, places, r.replaced, r.attached, r.detached,
                      {"path": r.path, "kept_maps": r.reused_maps})

    def unload(self, unit: str) -> list:
        return bpf.unload(self.pin_root, unit)

    def attach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        return bpf.attach(self.pin_root, unit, cgroup_path)

    def detach(self, unit: str, cgroup_path: str) -> dict[str, bool]:
        return bpf.detach(self.pin_root, unit, cgroup_path)

    def stats(self, unit: str) -> dict:
        return bpf.stats(self.pin_root, unit)

    def summary(self) -> list[dict]:
        return bpf.summary(self.pin_root)

    def set_values(self, unit: str, changes: list) -> list[str]:
        return bpf.set_values(self.pin_root, unit, changes)

    def events(self, units: list[str] | None = None, state_dir: str | None = None):
        from .bpf_events import BpfEvents

        return BpfEvents(self.pin_root, units, state_dir)

    def explain(self, checked, direction: str | None = None) -> tuple[dict, str]:
        """The C emitted for the expression (the header bpf/port_filter.c includes)."""
        ingress = checked if direction in (None, "ingress") else None
        egress = checked if direction in (None, "egress") else None
        choice = self.compiler or "auto"
        code = UnitProgram(ingress, egress, compiler=choice).header()
        compiler = describe_compiler(choice)
        return ({"expression": checked.text, "c": code, "compiler": compiler},
                f"/* compiler: {compiler} */\n" + code.rstrip("\n"))

    # -- programs in files (ProgramBackend) ------------------------------------------------------

    def built_as_guard(self, unit: str) -> bool:
        if not self._loaded(unit):
            return False
        try:
            with bpf.PinnedUnit.open(self.pin_root, unit) as pinned:
                return "slice_default" in pinned.meta  # build.UnitProgram.meta(): the guard build
        except Error:  # pins that cannot be read are no guard to keep: loading them again says why
            return False

    def prog_path(self, unit: str, direction: str) -> str:
        return bpf.prog_path(self.pin_root, unit, direction)

    def unit_dir(self, unit: str) -> str:
        return bpf.unit_dir(self.pin_root, unit)

    def program_ids(self, unit: str) -> dict[str, int]:
        """{direction: id} of the programs the unit's pins name."""
        with bpf.PinnedUnit.open(self.pin_root, unit) as u:
            return u.prog_ids()

    def pin(self, unit: str, direction: str, path: str) -> str:
        """Also pin the unit's program at `path` (the unit is marked: its programs may then run
        anywhere); the pin it was taken from."""
        return bpf.pin_elsewhere(self.pin_root, unit, direction, path)

    def test_run(self, program, direction: str, packets: list[bytes], params=None, sets=None,
                 devices=None) -> list[bool]:
        return bpf.test_run(program, direction, packets, params, sets, self.cache, devices)

    # -- the watcher -----------------------------------------------------------------------------

    def claim(self, state) -> None:
        """Nothing beyond the watcher's own lock, which is per pin root."""

    def guard(self, log):
        """Keeps the units' interface names matched to the devices as links come, go and are
        renamed (bpf_interfaces.py). The programs need no guard: the pins keep them, and
        check_pins (intact()) notices them removed."""
        from .bpf_interfaces import InterfaceGuard

        try:
            return InterfaceGuard(self.pin_root, log)
        except Error as e:  # the filters still run; only renamed devices are not followed
            log.error("interfaces", f"cannot follow network devices: {e}; interface names are matched "
                      "at load only (bpfwall set UNIT interfaces matches them again)")
            return None

    def prepare(self, entry) -> None:
        """Compile now (cached), so a bad build stops a reload before anything changes."""
        self.prepare_many([entry])

    def prepare_many(self, entries) -> None:
        """prepare() every entry: all values checked, then all compiled, clang runs side by side."""
        programs = []
        for entry in entries:
            programs.append(entry.program(self.compiler))
            bpf.check_values(programs[-1], entry.params, entry.sets)
        build_many(programs, self.cache)

    def ensure(self, entry, owned: Owned | None) -> tuple[UnitHandle, str]:
        """The entry's programs, pinned and open: (handle, "reused" | "adopted" | "loaded")."""
        fingerprint = entry.fingerprint()
        pinned = self._loaded(entry.name)
        if pinned and owned is not None and owned.fingerprint == fingerprint \
                and _program_ids(self.pin_root, entry.name) == owned.programs:
            how = "reused"
        elif pinned and owned is None and _pins_match_entry(self.pin_root, entry, entry.program(self.compiler)):
            how = "adopted"  # state lost (or loaded by hand) but identical: keep it running
        else:
            program = entry.program(self.compiler).resolved()
            with (self._verified(entry, program) if not pinned else contextlib.nullcontext()) as early:
                bpf.load(self.pin_root, entry.name, program, entry.params, entry.sets, entry.mode, self.cache,
                         preloaded=early, log=entry.log or None)
            how = "loaded"
        return UnitHandle.open(self.pin_root, entry.name, fingerprint), how

    def _verified(self, entry, program) -> loader.Loaded:
        """A new unit's programs loaded (verified) before bpf.load takes the pin root's lock, so
        the verifier works on several entries at once; the lock only covers pinning."""
        names = {bpf.PROG_SECTIONS[d]: bpf.program_name(self.pin_root, entry.name, d) for d in bpf.DIRECTIONS}
        return loader.load(build(program, self.cache), {}, names)

    def owned(self, handle: UnitHandle) -> Owned:
        return Owned(handle.fingerprint, self.name, dict(handle.ids))

    def holds(self, owned: Owned) -> bool:
        return True  # the watcher's records are kept per pin root

    def where(self, owned: Owned) -> str:
        return "the bpf backend"

    def _loaded(self, name: str) -> bool:
        """Pinned completely (a directory without meta is a load cut short: load again)."""
        return os.path.lexists(os.path.join(bpf.unit_dir(self.pin_root, name), "meta"))

    def release(self, unit: str, owned: Owned | None = None) -> list:
        """Detach the unit everywhere and remove its pins; [] if it was gone already."""
        try:
            return bpf.unload(self.pin_root, unit)
        except bpf.BackendError:
            if os.path.isdir(bpf.unit_dir(self.pin_root, unit)):
                raise
            return []  # gone already, and nothing of it attached anywhere

    def refresh(self, handles: dict) -> list:
        """Index our units' program names (`handles`: name → UnitHandle): every program a
        unit ever loaded carries its name, so stale ones a crash left are found too. A removed
        cgroup takes its programs with it, so nothing is ever left to drop: []."""
        self._owner = {h.names[d]: (name, d) for name, h in handles.items() if h.backend == self.name
                       for d in bpf.DIRECTIONS}
        # By id too: names are read by id, which needs CAP_SYS_ADMIN (bpfwall.service has not).
        self._owner_ids = {pid: (name, d) for name, h in handles.items() if h.backend == self.name
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

    # The pins are the record: nothing is written beside them.
    def defer_records(self, on: bool) -> None:
        pass

    def unrecorded(self) -> dict[str, str]:
        return {}

    def retry_records(self) -> None:
        pass

    def lost_records(self) -> list[str]:
        return []
