"""The BPF backend: build → load → pin → attach, and everything read back from pins.

A unit's pins live in `<pin root>/<unit key>/`:

    ingress, egress      the programs (either may be absent)
    counters, mode       the program's maps (program_contract.py states what they hold):
    params, set_<name>   counts, enforce/audit, $params, @sets and,
    meta                 in meta, JSON: expressions, param order, set kinds, capacity
    link_<dir>_<cgid>    a bpf_link running the unit's program on cgroup id <cgid>
    next_<dir>           a reload's new program, between its swap and its rename

`meta` makes the pins self-describing, so stats/set/tune need nothing else;
`meta` is pinned last, so a directory without it is a load cut short.

What runs on a cgroup is always named by a pin. Attachments bpfwall makes are
pinned bpf_links (a link whose pin was never made dies with the process that
made it); systemd's (IP*FilterPath=) run the program pinned at ingress/egress,
or, during a reload, at next_<dir>. Every program is loaded under a name that
carries a hash of (pin root, unit) and its direction, so a program left
anywhere by a crash is recognised as the unit's, swapped or removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import program_contract as pc
from .. import unitkey
from ..build import UnitProgram, build
from ..compilers import UNRECORDED as UNRECORDED_COMPILER
from ..crashpoint import reached
from ..errors import Error
from ..kernel import cgroup, links, loader, maps, netdev, pins, progs
from ..kernel.errors import KernelError
from ..lang.setcontents import Contents, count
from ..lang.values import PARAM_MAX, parse_set_elements
from ..program_contract import DIRECTIONS, MODES, PROG_SECTIONS, key_of, set_map, value_of

DEFAULT_PIN_ROOT = "/sys/fs/bpf/bpfwall"
# Maps whose contents survive a reload when the new object's map is compatible (the events
# ring too: a monitor reading it goes on reading across a reload; a slice default's guard: the
# watcher's classification of its descendants).
KEPT_MAPS = (pc.COUNTERS, pc.MODE, pc.EVENTS, pc.LOG_LIMIT, pc.EVENTS_LOST, pc.GUARD, pc.GUARD_MORE)
LOG_KEYS = ("log_rate", "log_burst")
ETH_P = {4: 0x0800, 6: 0x86DD}


class BackendError(Error):
    """A request the backend refuses; the message is one line for the user."""


# -- set contents as map keys (the encodings are program_contract's) ----------

def set_keys(kind: str, elements) -> list[bytes]:
    """The map keys of `elements`, one per number or network. This enumerates every number of
    every range: count first (setcontents.count) and call it only for contents that fit."""
    return [key_of(kind, v) for v in Contents(kind, elements).values()]


# -- paths --------------------------------------------------------------------

def unit_dir(pin_root: str, unit: str) -> str:
    try:
        return os.path.join(pin_root, unitkey.encode(unit))
    except unitkey.UnitNameError as e:
        raise BackendError(str(e)) from None


def prog_path(pin_root: str, unit: str, direction: str) -> str:
    return os.path.join(unit_dir(pin_root, unit), direction)


LINK_PREFIX = "link_"
NEXT_PREFIX = "next_"


def link_name(direction: str, cgroup_id: int) -> str:
    return f"{LINK_PREFIX}{direction}_{cgroup_id}"


def parse_link_name(name: str) -> tuple[str, int] | None:
    """(direction, cgroup id) of a link pin's name, None for other names."""
    if not name.startswith(LINK_PREFIX):
        return None
    direction, _, cgid = name[len(LINK_PREFIX):].partition("_")
    if direction not in DIRECTIONS or not cgid.isdigit():
        return None
    return direction, int(cgid)


def pinned_links(d: pins.PinDir) -> list[tuple[str, str, int, links.LinkInfo]]:
    """(pin name, direction, cgroup id, the link's info) of every link pinned in the unit's directory."""
    out = []
    for name in d.names():
        if (key := parse_link_name(name)) is None:
            continue
        lfd = d.get(name)
        try:
            out.append((name, key[0], key[1], links.info(lfd)))
        finally:
            os.close(lfd)
    return out


def program_name(pin_root: str, unit: str, direction: str) -> str:
    """The kernel name of the unit's program (15 characters): 'bpfw_i_' or 'bpfw_e_' and a hash of
    (pin root, unit). Found attached anywhere, a program is known as this unit's by its name alone."""
    digest = hashlib.sha256(f"{os.path.abspath(pin_root)}\0{unit}".encode()).hexdigest()[:8]
    return f"bpfw_{direction[0]}_{digest}"


_name_of_id: dict[int, str] = {}  # program ids are not reused while the kernel runs


def name_of(prog_id: int) -> str | None:
    """The kernel name of program `prog_id`; None if it is gone, or if we may not open programs
    by id (that needs CAP_SYS_ADMIN: the hardened units run without it, and then only the
    programs the pins name are recognised)."""
    name = _name_of_id.get(prog_id)
    if name is None:
        try:
            with progs.Program.from_id(prog_id) as prog:
                name = _name_of_id[prog_id] = prog.info.name
        except KernelError:
            return None
    return name


class UnitPrograms:
    """What belongs to one unit: the programs its pins name (id → direction, with an fd to act
    on each without CAP_SYS_ADMIN) and, where the kernel lets us look, any program loaded
    under the unit's name (a crash's leftover that no pin names any more)."""

    def __init__(self, pin_root: str, unit: str):
        self.names = {program_name(pin_root, unit, dr): dr for dr in DIRECTIONS}
        self.fds: dict[int, tuple[str, int]] = {}
        self.ids: dict[int, str] = {}  # programs known by id alone (what our links run)
        self._owned: list[int] = []

    def add(self, direction: str, fd: int, owned: bool = False) -> None:
        self.fds[progs.prog_info(fd).id] = (direction, fd)
        if owned:
            self._owned.append(fd)

    @classmethod
    def of(cls, pin_root: str, unit: str, d: pins.PinDir | None) -> "UnitPrograms":
        """Indexed from the unit's pin directory `d` (None: by name alone)."""
        self = cls(pin_root, unit)
        try:
            for name in d.names() if d is not None else ():
                direction = name[len(NEXT_PREFIX):] if name.startswith(NEXT_PREFIX) else name
                if direction in DIRECTIONS:
                    self.add(direction, d.get(name), owned=True)
            for _, direction, _, info in pinned_links(d) if d is not None else ():
                self.ids[info.prog_id] = direction
        except BaseException:
            self.close()
            raise
        return self

    def direction_of(self, prog_id: int) -> str | None:
        if prog_id in self.fds:
            return self.fds[prog_id][0]
        if prog_id in self.ids:
            return self.ids[prog_id]
        return self.names.get(name_of(prog_id))

    def fd(self, prog_id: int) -> int | None:
        known = self.fds.get(prog_id)
        return known[1] if known else None

    def close(self) -> None:
        for fd in self._owned:
            os.close(fd)
        self._owned.clear()

    def __enter__(self) -> "UnitPrograms":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Lock(threading.local):
    depth: dict

    def __init__(self):
        self.depth = {}


_held = _Lock()


CAP_SYS_ADMIN, CAP_BPF = 21, 39


def _require_privilege() -> None:
    """Refuse before creating anything: an unprivileged `load` must not leave a pin root
    behind (on a 1777 bpffs it could; root would then rightly refuse that directory)."""
    if os.geteuid() == 0:
        return
    try:
        with open("/proc/self/status") as f:
            caps = int(next(line.split()[1] for line in f if line.startswith("CapEff:")), 16)
    except (OSError, StopIteration, ValueError):
        caps = 0
    if not caps & (1 << CAP_SYS_ADMIN | 1 << CAP_BPF):
        raise BackendError("loading filters needs root (or CAP_BPF with CAP_NET_ADMIN and CAP_PERFMON)")


@contextmanager
def _locked(pin_root: str):
    """Serialize changes to one pin root (two `load`s of one unit must not interleave); yields
    the checked pin root. Re-entrant within a thread (flock is per open file, not per process)."""
    key = os.path.abspath(pin_root)
    _require_privilege()
    root = pins.PinDir.open(key, create=True)
    try:
        if _held.depth.get(key, 0) == 0:
            fcntl.flock(root.fd, fcntl.LOCK_EX)
        _held.depth[key] = _held.depth.get(key, 0) + 1
        try:
            yield root
        finally:
            _held.depth[key] -= 1
    finally:
        root.close()  # closing the last fd of the flock releases it


def open_root(pin_root: str) -> pins.PinDir:
    """The pin root, opened through checked fds (BackendError when it does not exist)."""
    try:
        return pins.PinDir.open(pin_root)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            raise BackendError(f"nothing is loaded under {pin_root} (it does not exist)") from None
        raise


# -- a loaded unit, opened from its pins --------------------------------------

@dataclass
class PinnedUnit:
    unit: str
    path: str
    meta: dict
    maps: dict[str, int] = field(default_factory=dict)
    progs: dict[str, int] = field(default_factory=dict)
    links: dict[tuple[str, int], str] = field(default_factory=dict)  # (direction, cgroup id) → pin name
    staged: list[str] = field(default_factory=list)  # next_<dir> pins a reload left behind
    _views: dict[str, maps.Map] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, pin_root: str, unit: str, root: pins.PinDir | None = None) -> "PinnedUnit":
        path = unit_dir(pin_root, unit)
        self = cls(unit, path, {})
        try:
            own_root = root is None
            if own_root:
                try:
                    root = pins.PinDir.open(pin_root)
                except KernelError as e:
                    if e.errno != errno.ENOENT:
                        raise
                    root = None
            try:
                if root is None or not root.exists(unitkey.encode(unit)):
                    raise BackendError(f"unit {unit} is not loaded (no pins at {path}); load it with: "
                                       f"bpfwall load {unit} --ingress EXPR")
                with root.sub(unitkey.encode(unit)) as d:
                    self._read(d)
            finally:
                if own_root and root is not None:
                    root.close()
        except BaseException:
            self.close()
            raise
        return self

    def _read(self, d: pins.PinDir) -> None:
        for name in d.names():
            if name in DIRECTIONS:
                self.progs[name] = d.get(name)
            elif (key := parse_link_name(name)) is not None:
                self.links[key] = name
            elif name.startswith(NEXT_PREFIX):
                self.staged.append(name)
            elif not name.startswith(("tmp", "mark_")):
                self.maps[name] = d.get(name)
        if "meta" not in self.maps:
            raise BackendError(f"{self.path} has no meta pin: a load was cut short; load {self.unit} again "
                               "to complete it, or unload it")
        raw = self.map(pc.META).lookup(pc.ZERO)
        try:
            self.meta = json.loads(pc.decode_meta(raw))
            self.meta.setdefault("compiler", UNRECORDED_COMPILER)  # a meta from before bcc: clang built it
        except (ValueError, AttributeError):
            raise BackendError(f"{self.path}/meta does not hold bpfwall's description of a unit") from None

    def close(self) -> None:
        self._views.clear()
        for fd in [*self.maps.values(), *self.progs.values()]:
            os.close(fd)
        self.maps.clear()
        self.progs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def map(self, name: str) -> maps.Map:
        """The map pinned as `name`, its info read once (the fd stays in `maps`, ours to close)."""
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = maps.Map(self.maps[name])
        return view

    def prog_ids(self) -> dict[str, int]:
        """{direction: id} of the programs the pins name now."""
        return {d: progs.prog_info(fd).id for d, fd in self.progs.items()}

    def write_meta(self, description: bytes) -> None:
        meta = self.map(pc.META)
        meta.update(pc.ZERO, pc.encode_meta(description, meta.info.value_size))

    # params
    def params(self) -> dict[str, int]:
        names = self.meta["params"]
        if not names:
            return {}
        return pc.decode_params(names, self.map(pc.PARAMS).lookup(pc.ZERO))

    def write_params(self, values: dict[str, int]) -> None:
        names = self.meta["params"]
        if names:
            self.map(pc.PARAMS).update(pc.ZERO, pc.encode_params(names, values))

    # mode
    def mode(self) -> str:
        raw = self.map(pc.MODE).lookup(pc.ZERO)
        return pc.mode_name(raw) if raw else "enforce"

    def write_mode(self, mode: str) -> None:
        self.map(pc.MODE).update(pc.ZERO, pc.mode_value(mode))

    # drop events: the token bucket's settings (the same in both directions) and the losses
    def log_limit(self) -> dict[str, int]:
        if pc.LOG_LIMIT not in self.maps:  # pinned by a bpfwall without events
            return {"log_rate": 0, "log_burst": 0}
        rate, burst = pc.decode_log_limit(self.map(pc.LOG_LIMIT).lookup(pc.number_key(0)))
        return {"log_rate": rate, "log_burst": burst}

    def write_log_limit(self, limit: dict[str, int]) -> None:
        """The bucket starts full again. A program may take a token meanwhile (a compare-and-swap
        on `tat`) and so keep one event's worth of the old bucket: the limit holds either way."""
        m = self.map(pc.LOG_LIMIT)
        for i in range(len(DIRECTIONS)):
            m.update(pc.number_key(i), pc.log_limit_value(limit["log_rate"], limit["log_burst"]))

    def events_lost(self) -> dict[str, int]:
        if pc.EVENTS_LOST not in self.maps:
            return {d: 0 for d in DIRECTIONS}
        m = self.map(pc.EVENTS_LOST)
        return {d: pc.sum_lost(m.lookup_percpu(pc.number_key(i)) or []) for i, d in enumerate(DIRECTIONS)}

    def events(self) -> dict:
        """What `stats` shows under "events"."""
        return {**self.log_limit(), "lost": self.events_lost()}

    # counters: per direction, summed over CPUs
    def counters(self) -> dict:
        counters = self.map(pc.COUNTERS)
        out = {}
        for direction in DIRECTIONS:
            entry = {}
            for dropped, label in ((False, "pass"), (True, "drop")):
                slot = pc.number_key(pc.counter_slot(direction, dropped))
                total = pc.sum_counters(counters.lookup_percpu(slot) or [])
                entry[label] = {"packets": total.packets, "bytes": total.bytes}
            out[direction] = entry
        return out

    # sets
    def set_kind(self, name: str) -> str:
        kinds = self.meta["sets"]
        if name not in kinds:
            have = ", ".join("@" + n for n in sorted(kinds)) or "none"
            raise BackendError(f"unit {self.unit} has no set @{name} (its sets: {have})")
        return kinds[name]

    def _set_keys(self, name: str) -> list[bytes]:
        return list(self.map(set_map(name)).keys())

    def set_contents(self, name: str) -> Contents:
        kind = self.set_kind(name)
        return Contents(kind, (value_of(kind, k) for k in self._set_keys(name)))

    def set_elements(self, name: str) -> list[str]:
        kind = self.set_kind(name)
        values = sorted((value_of(kind, k) for k in self._set_keys(name)),
                        key=(lambda v: v) if kind == "number" else (lambda n: (n.version, n)))
        return [str(v) for v in values]

    # interface names → the devices of this network namespace (`ifaces`; see kernel/netdev.py)
    @property
    def interfaces(self) -> list[str]:
        return self.meta.get("interfaces", [])

    def write_interfaces(self, found: dict[int, str] | None = None, cookie: int | None = None) -> int:
        """Make `ifaces` hold, for each device whose name matches one of the unit's interface
        names, the bits of the names it matches (`found`: {ifindex: name}, default the devices
        now). A renamed device's value is replaced in place, a device that matches no more is
        removed: each key changes at once, never through a state with neither value. Returns
        how many devices match."""
        if not self.interfaces:
            return 0
        found = netdev.devices() if found is None else found
        cookie = netdev.netns_cookie() if cookie is None else cookie
        wanted = {}
        for index, name in found.items():
            bits = pc.iface_bits(self.interfaces, name)
            if bits:
                wanted[pc.iface_key(cookie, index)] = bytes(pc.IfaceBits(bits))
        m = self.map(pc.IFACES)
        _check_fits("ifaces", len(wanted), m.info.max_entries, " (devices whose name matches)")
        for key, value in wanted.items():
            if m.lookup(key) != value:
                m.update(key, value)
        for key in [k for k in m.keys() if k not in wanted]:
            m.delete(key)
        return len(wanted)

    def replace_set(self, name: str, elements) -> None:
        self.write_set(name, Contents(self.set_kind(name), elements))

    def write_set(self, name: str, new: Contents) -> None:
        """Make @name hold exactly `new`, refused before the first write if it does not fit;
        if a write fails, the previous contents are put back before the error is raised."""
        kind = self.set_kind(name)
        m = self.map(set_map(name))
        capacity = m.info.max_entries
        _check_fits(name, len(new), capacity)
        old = list(m.keys())
        unwanted = [k for k in old if value_of(kind, k) not in new]
        have = set(old)
        wanted = (k for k in (key_of(kind, v) for v in new.values()) if k not in have)
        added: list[bytes] = []
        removed: list[bytes] = []
        try:
            if len(new) + len(unwanted) <= capacity:  # old ∪ new fits
                # Room for the old and the new contents at once: add, then remove, so that
                # no element either of them allows is missing for a moment.
                _add_keys(m, wanted, added)
                _delete_keys(m, unwanted, removed)
            else:
                # No room for both: the elements that go are removed first, then the new ones
                # added. Elements kept across the change are never touched, so nothing the old
                # and the new contents both allow is missing for a moment.
                _delete_keys(m, unwanted, removed)
                _add_keys(m, wanted, added)
        except BaseException:
            _restore_keys(m, added, removed)
            raise

    # all-or-nothing live changes (`bpfwall set`)
    def change(self, changes: list) -> list[str]:
        """Apply ("param", name, value), ("mode", m), ("set", name, "+"|"-"|"=", "E1,E2,…")
        all or nothing: every change is checked (params exist and are in range, sets exist,
        elements parse, each set fits its capacity after all its changes) before the first
        write; if a kernel write fails, what was written is put back. Messages of what was done."""
        old = _Values(self.params(), self.mode(), {}, self.log_limit())
        new, done = self._planned(changes, old)
        for name, contents in new.sets.items():
            _check_fits(name, len(contents), self.map(set_map(name)).info.max_entries, "; nothing was changed")
        self._write(old, new)
        if new.interfaces:  # last, and nothing to undo: it brings the devices up to date
            n = self.write_interfaces()
            done.append(f"interfaces: {n} device(s) match {', '.join(self.interfaces)}")
        return done

    def _planned(self, changes: list, old: "_Values") -> tuple["_Values", list[str]]:
        """The values after `changes` (sets as counted contents; `old.sets` gets the previous
        contents of each set changed); refuses the first change that is wrong."""
        new, done = _Values(dict(old.params), old.mode, {}, dict(old.log)), []
        for change in changes:
            if change[0] == "param":
                _, name, value = change
                if name not in self.meta["params"]:
                    have = ", ".join("$" + p for p in self.meta["params"]) or "none"
                    raise BackendError(f"unit {self.unit} has no parameter ${name} (its params: {have})")
                if not 0 <= value <= PARAM_MAX:
                    raise BackendError(f"param ${name}: {value} is out of range (0..{PARAM_MAX})")
                new.params[name] = value
                done.append(f"${name} = {value}")
            elif change[0] == "mode":
                if change[1] not in MODES:
                    raise BackendError(f"mode={change[1]}: mode is enforce or audit")
                new.mode = change[1]
                done.append(f"mode = {new.mode}")
            elif change[0] == "log":
                _, name, value = change
                check_log_limit(name, value)
                new.log[name] = value
                done.append(f"{name} = {value}")
            elif change[0] == "interfaces":
                if not self.interfaces:
                    raise BackendError(f"unit {self.unit} names no interfaces (its filters do not read ifname)")
                new.interfaces = True
            elif change[0] == "set":
                _, name, op, raw = change
                kind = self.set_kind(name)
                elements = parse_set_elements(name, kind, raw) if isinstance(raw, str) else list(raw)
                if name not in old.sets:
                    old.sets[name] = self.set_contents(name)
                    new.sets[name] = old.sets[name].copy()
                if op == "+":
                    new.sets[name].add(elements)
                    done.append(f"@{name}: added {count(kind, elements)}")
                elif op == "-":
                    done.append(f"@{name}: removed {new.sets[name].remove(elements)}")
                elif op == "=":
                    new.sets[name] = Contents(kind, elements)
                    done.append(f"@{name}: replaced, {len(new.sets[name])} element(s)")
                else:
                    raise BackendError(f"@{name}{op}: write @set+ELEMENTS, @set-ELEMENTS or @set=ELEMENTS")
            else:
                raise BackendError(f"unknown change {change!r}")
        return new, done

    def _write(self, old: "_Values", new: "_Values") -> None:
        """Write `new` where it differs from `old`; on failure put `old` back where written."""
        undo = []
        try:
            if new.params != old.params:
                self.write_params(new.params)
                undo.append(lambda: self.write_params(old.params))
            if new.mode != old.mode:
                self.write_mode(new.mode)
                undo.append(lambda: self.write_mode(old.mode))
            if new.log != old.log:
                self.write_log_limit(new.log)
                undo.append(lambda: self.write_log_limit(old.log))
            for name, contents in new.sets.items():
                self.write_set(name, contents)  # puts its own contents back if it fails
                undo.append(lambda name=name: self.write_set(name, old.sets[name]))

        except BaseException:
            for step in reversed(undo):
                try:
                    step()
                except (KernelError, BackendError):
                    pass  # put back what can be; the first error is the one to report
            raise


@dataclass
class _Values:
    """What `bpfwall set` changes: params, mode, (changed) sets' contents, the events' limit."""
    params: dict[str, int]
    mode: str
    sets: dict[str, Contents]
    log: dict[str, int]
    interfaces: bool = False  # look the interface names up again


def check_log_limit(name: str, value: int) -> None:
    if name not in LOG_KEYS:
        raise BackendError(f"{name}: the events' limit is log_rate or log_burst")
    lo = 0 if name == "log_rate" else 1  # one bound for both backends (events.check_log_setting)
    if not isinstance(value, int) or not lo <= value <= pc.LOG_LIMIT_MAX:
        raise BackendError(f"{name}={value}: out of range ({lo}..{pc.LOG_LIMIT_MAX}; log_rate=0 turns events off)")


def default_log_limit(log: dict[str, int] | None = None) -> dict[str, int]:
    """`log` (log_rate, log_burst; either may be missing) checked, with the defaults filled in."""
    out = {"log_rate": pc.LOG_RATE_DEFAULT, "log_burst": pc.LOG_BURST_DEFAULT, **(log or {})}
    for name, value in out.items():
        check_log_limit(name, value)
    return out


def _check_fits(name: str, n: int, capacity: int, note: str = "") -> None:
    if n > capacity:
        raise BackendError(f"set @{name} would hold {n} elements; its map holds {capacity} "
                           f"(reload with a larger --set-capacity){note}")


def _add_keys(m: maps.Map, keys, added: list) -> None:
    for k in keys:
        m.update(k, pc.PRESENT)
        added.append(k)


def _delete_keys(m: maps.Map, keys, removed: list) -> None:
    for k in keys:
        if m.delete(k):
            removed.append(k)


def _restore_keys(m: maps.Map, added: list, removed: list) -> None:
    """Undo a partial write_set: drop what was added (making room), put back what was removed."""
    for k in added:
        try:
            m.delete(k)
        except KernelError:
            pass
    for k in removed:
        try:
            m.update(k, pc.PRESENT)
        except KernelError:
            pass


# -- load / unload ------------------------------------------------------------

@dataclass
class LoadResult:
    unit: str
    path: str
    replaced: list = field(default_factory=list)  # (cgroup, direction)
    attached: list = field(default_factory=list)
    detached: list = field(default_factory=list)
    reused_maps: list = field(default_factory=list)


def check_values(program: UnitProgram, params: dict[str, int], sets: dict[str, list]) -> None:
    """Refuse values for params/sets the expressions do not use, and sets over the capacity
    (counted, not enumerated), before touching the kernel."""
    for name in params:
        if name not in program.params:
            have = ", ".join("$" + p for p in program.params) or "none"
            raise BackendError(f"--param {name}: the filter has no parameter ${name} (its params: {have})")
    for name, elements in sets.items():
        if name not in program.sets:
            have = ", ".join("@" + s for s in sorted(program.sets)) or "none"
            raise BackendError(f"--set {name}: the filter has no set @{name} (its sets: {have})")
        n = count(program.sets[name], elements)
        if n > program.set_capacity:
            raise BackendError(f"--set {name}: {n} elements do not fit the set's capacity "
                               f"{program.set_capacity} (use --set-capacity)")


def set_values(pin_root: str, unit: str, changes: list) -> list[str]:
    """`bpfwall set`: PinnedUnit.change on the unit's pins, under the pin root's lock (a set
    never interleaves with a load that is swapping the unit's maps)."""
    with _locked(pin_root) as root, PinnedUnit.open(pin_root, unit, root) as u:
        return u.change(changes)


def load(pin_root: str, unit: str, program: UnitProgram, params: dict[str, int] | None = None,
         sets: dict[str, list] | None = None, mode: str | None = None, cache=None,
         preloaded: loader.Loaded | None = None, log: dict[str, int] | None = None) -> LoadResult:
    """Build and pin `unit`'s programs; if it is loaded already, swap them in place everywhere.
    `preloaded`: the object loaded by the caller with fresh maps and the unit's program names,
    before the pin root's lock, so that the verifier works on many units side by side; used when
    nothing of the unit is pinned (no maps to keep), else loaded again here. The caller closes it.
    `log`: the events' log_rate/log_burst (given: written; else kept, or the defaults when new)."""
    params, sets = params or {}, sets or {}
    unit_dir(pin_root, unit)  # a unit name that cannot be a key fails here, before anything
    program = program.resolved()  # meta names the compiler that built it
    check_values(program, params, sets)
    for name, value in (log or {}).items():
        check_log_limit(name, value)
    obj = build(program, cache) if preloaded is None else None
    names = {PROG_SECTIONS[d]: program_name(pin_root, unit, d) for d in DIRECTIONS}
    with _locked(pin_root) as root, root.sub(unitkey.encode(unit), create=True) as d:
        old, cut_short = _open_for_load(pin_root, unit, root, d)
        if old is not None and obj is None:
            obj = build(program, cache)  # maps to keep: the programs are loaded again, with them
        try:
            return _load_locked(pin_root, d, unit, program, obj, names, params, sets, mode, old, cut_short,
                                preloaded if old is None else None, log)
        finally:
            if old is not None:
                old.close()


def _open_for_load(pin_root: str, unit: str, root, d) -> tuple[PinnedUnit | None, bool]:
    """The unit as pinned now, or None. A directory without `meta` is a load (or unload) cut
    short: what it holds is ours and is removed, but its links are kept for the new programs to
    take over; (None, True) says so, and the new load then also looks for the unit's programs
    left attached anywhere."""
    entries = d.names()
    if "meta" in entries:
        return PinnedUnit.open(pin_root, unit, root), False
    for name in entries:
        if parse_link_name(name) is None:
            d.unpin(name)
    return None, bool(entries)


def _reusable(old: PinnedUnit | None, obj, program: UnitProgram) -> dict[str, int]:
    if old is None:
        return {}
    reuse = {}
    for name, mapdef in obj.maps.items():
        fd = old.maps.get(name)
        if fd is None or not loader.map_compatible(fd, mapdef):
            continue
        if name in KEPT_MAPS or name.startswith("set_"):
            reuse[name] = fd
        elif name == "params" and old.meta.get("params") == program.params:
            reuse[name] = fd
    return reuse


def _load_locked(pin_root, d, unit, program, obj, names, params, sets, mode, old, cut_short,
                 preloaded=None, log=None) -> LoadResult:
    """The load's steps, each a consistent state to crash in (see crashpoint.reached):
    maps pinned → new programs pinned as next_<dir> → every attachment swapped (links updated,
    systemd's replaced in place) → next_<dir> renamed over <dir> → meta pinned last."""
    result = LoadResult(unit, d.path)
    reuse = _reusable(old, obj, program)
    loaded = preloaded if preloaded is not None else loader.load(obj, reuse, names)
    undo: list = []
    new = None
    # The programs the pins name now (also a crashed reload's next_<dir>), held open before the
    # new ones take their pins: each can then be found and swapped on any cgroup.
    known = UnitPrograms.of(pin_root, unit, d)
    try:
        new = PinnedUnit(unit, d.path, program.meta(), dict(loaded.maps), {})
        new.progs = {dr: loaded.progs[PROG_SECTIONS[dr]] for dr in DIRECTIONS if getattr(program, dr) is not None}
        # Contents: meta always; params carried over by name; sets as given or kept.
        new.write_meta(program.meta_bytes())
        kept = old.params() if old is not None else {}
        if params or "params" not in reuse:
            new.write_params({**{n: v for n, v in kept.items() if n in program.params}, **params})
        if mode is not None:
            new.write_mode(mode)
        if log or pc.LOG_LIMIT not in reuse:
            kept_log = old.log_limit() if old is not None and pc.LOG_LIMIT in old.maps else {}
            new.write_log_limit(default_log_limit({**kept_log, **(log or {})}))
        for name, elements in sets.items():
            new.replace_set(name, elements)
        new.write_interfaces()
        result.reused_maps = sorted(reuse)
        reached("load:built")

        for name, fd in new.maps.items():
            if name not in reuse and name != "meta":
                d.replace(fd, name)
        reached("load:maps-pinned")
        for direction, fd in new.progs.items():
            d.replace(fd, NEXT_PREFIX + direction)
        reached("load:staged")
        if old is not None or cut_short or any(parse_link_name(n) for n in d.names()):
            where = where_to_look(unit, d, deep=cut_short)
            _swap_attachments(d, new, known, where, result, undo, set(old.progs) if old else set(DIRECTIONS))
        reached("load:swapped")
        for direction in DIRECTIONS:
            if direction in new.progs:
                d.rename(NEXT_PREFIX + direction, direction)
            else:
                d.unpin(direction)
        reached("load:programs-pinned")
        if old is not None:
            for name in [*old.maps, *old.staged]:
                if name not in new.maps and name != "meta":
                    d.unpin(name)
        d.replace(new.maps["meta"], "meta")
        reached("load:done")
        return result
    except BaseException:
        for action in reversed(undo):
            try:
                action()
            except (KernelError, OSError):
                pass  # best effort: the next load completes what is left
        for direction in new.progs if new is not None else ():
            try:
                d.unpin(NEXT_PREFIX + direction)
            except KernelError:
                pass
        if old is None:
            _clear_dir(d, keep_links=True)
        raise
    finally:
        known.close()
        loaded.close()


MARK_ELSEWHERE = "mark_pinned_elsewhere"  # `bpfwall pin` handed a program out: its users are unknown


def where_to_look(unit: str, d: pins.PinDir | None, deep: bool = False) -> list[str] | None:
    """The cgroups the unit can run on: those its pinned links name, and the ones systemd made
    for it (hand-off: named after the unit, in a slice). None means everywhere — when the unit's
    pins are gone or a load was cut short (a crash's leftovers may be anywhere), or `bpfwall pin`
    handed its program to users we cannot know — and then the whole tree is queried."""
    if deep or d is None or d.exists(MARK_ELSEWHERE):
        return None
    paths = set(cgroup.unit_cgroups(unit))
    live = [cgid for _, _, cgid, info in pinned_links(d) if not info.defunct]
    for path in cgroup.paths_of_ids(live).values():
        if path is None:
            return None  # not allowed to resolve ids to paths (no CAP_DAC_READ_SEARCH), or racing a removal
        paths.add(path)
    return sorted(paths)


def _attached_anywhere(known: UnitPrograms, where: list[str] | None) -> list[tuple[str, str, int]]:
    """(cgroup, direction, program id) of every program of the unit attached on the cgroups
    `where` (None: anywhere)."""
    return [(cg, dr, pid) for cg, dr, pid in cgroup.find_attachments(known.direction_of, where)
            if known.direction_of(pid) == dr]


def _cgroup_ids(paths) -> dict[int, str]:
    out = {}
    for path in paths:
        try:
            out[cgroup.cgroup_id(path)] = path
        except KernelError:
            pass  # removed meanwhile
    return out


def _swap_attachments(d, new: PinnedUnit, known: UnitPrograms, where: list[str] | None, result: LoadResult,
                      undo: list, old_dirs: set) -> None:
    """Make every attachment of the unit run the new programs: its pinned links are updated
    (BPF_LINK_UPDATE), programs attached with BPF_PROG_ATTACH (systemd's IP*FilterPath=, or an
    older bpfwall's) are replaced in place (BPF_F_REPLACE), duplicates detached; a direction the
    unit no longer filters is detached, and one it newly filters reaches its cgroups too."""
    new_ids = {dr: progs.prog_info(fd).id for dr, fd in new.progs.items()}
    linked_cgroups: dict[int, set[str]] = {}
    for name, direction, cgid, info in pinned_links(d):
        if info.defunct:
            d.unpin(name)  # its cgroup is gone
        elif direction in new.progs:
            if info.prog_id != new_ids[direction]:
                lfd = d.get(name)
                try:
                    links.update(lfd, new.progs[direction], None, f"the link {d.path}/{name}")
                finally:
                    os.close(lfd)
                undo.append(lambda name=name, old_id=info.prog_id: _link_back(d, name, old_id, known))
                result.replaced.append((cgid, direction))
                reached("load:link-updated")
            linked_cgroups.setdefault(cgid, set()).add(direction)
        elif _drop_link(d, name):
            result.detached.append((cgid, direction))
    for direction, fd in new.progs.items():
        known.add(direction, fd)
    found = _attached_anywhere(known, where)
    by_id = _cgroup_ids({cg for cg, _, _ in found})
    result.replaced = [(by_id.get(c, f"cgroup id {c}"), dr) for c, dr in result.replaced]
    result.detached = [(by_id.get(c, f"cgroup id {c}"), dr) for c, dr in result.detached]
    on = {}
    for cg, dr, pid in found:
        on.setdefault((cg, dr), []).append(pid)
    for (cg, dr), ids in sorted(on.items()):
        if dr not in new.progs:
            for pid in ids:
                if cgroup.detach_id(cg, pid, dr, known.fd(pid)):
                    result.detached.append((cg, dr))
            continue
        stale = [pid for pid in ids if pid != new_ids[dr]]
        if stale and new_ids[dr] not in ids:
            if cgroup.replace_id(cg, new.progs[dr], stale[0], dr, known.fd(stale[0])):
                old_id = stale.pop(0)
                undo.append(lambda cg=cg, dr=dr, old_id=old_id: _put_back(cg, dr, old_id, new, known))
                result.replaced.append((cg, dr))
                reached("load:replaced")
        for pid in stale:  # a second program of the unit on one cgroup: a crash's leftover
            if cgroup.detach_id(cg, pid, dr, known.fd(pid)):
                result.detached.append((cg, dr))
    # A direction the unit did not filter before now reaches its cgroups too.
    where = sorted({cg for cg, _, _ in found} | {by_id[c] for c in linked_cgroups if c in by_id})
    for cg in where:
        for dr, fd in new.progs.items():
            if dr not in old_dirs and (cg, dr) not in on:
                name = next(n for n, x in known.names.items() if x == dr)  # the unit's name for dr
                if attach_programs(d, cg, {dr: fd}, {dr: name})[dr]:
                    result.attached.append((cg, dr))


def _fd_by_id(prog_id: int, known: UnitPrograms) -> int:
    fd = known.fd(prog_id)
    if fd is None:
        raise KernelError(errno.ENOENT, f"program id {prog_id} is no longer held")
    return fd


def _put_back(cg: str, direction: str, old_id: int, new: PinnedUnit, known: UnitPrograms) -> None:
    """Undo one in-place replacement: the old program takes the new one's place again."""
    new_fd = new.progs[direction]
    cgroup.replace_id(cg, _fd_by_id(old_id, known), progs.prog_info(new_fd).id, direction, new_fd)


def _link_back(d, name: str, old_id: int, known: UnitPrograms) -> None:
    _update_link(d, name, _fd_by_id(old_id, known))


def _clear_dir(d, keep_links: bool = False) -> None:
    """Remove the unit directory's pins, `meta` first (so a crash meanwhile leaves a directory
    the next load or unload recognises as cut short), then the directory if it is empty."""
    names = d.names()
    for name in sorted(names, key=lambda n: n != "meta"):
        if keep_links and parse_link_name(name) is not None:
            continue
        d.unpin(name)
        reached("unload:unpinned")


def unload(pin_root: str, unit: str) -> list:
    """Detach the unit's programs everywhere (pinned links, systemd's attachments, and any
    program of the unit a crash left behind, found by name), then remove its pins."""
    unit_dir(pin_root, unit)  # refuses a name that cannot be a unit key
    key = unitkey.encode(unit)
    with _locked(pin_root) as root:
        present = root.exists(key)
        with root.sub(key) if present else _nothing() as d, UnitPrograms.of(pin_root, unit, d) as known:
            return _unload_locked(pin_root, unit, root, key, present, known)


@contextmanager
def _nothing():
    yield None


def _unload_locked(pin_root, unit, root, key, present, known) -> list:
    if present:
        with root.sub(key) as d:
            where = where_to_look(unit, d, deep="meta" not in d.names())
    else:
        where = None  # pins gone: the unit's programs may be anywhere, found by name
    found = _attached_anywhere(known, where)
    by_id = _cgroup_ids({cg for cg, _, _ in found})
    detached = []
    if present:
        with root.sub(key) as d:
            for name in d.names():
                if (link_key := parse_link_name(name)) is None:
                    continue
                if _drop_link(d, name):  # detached and unpinned; False: it was defunct (unpinned too)
                    detached.append((by_id.get(link_key[1], f"cgroup id {link_key[1]}"), link_key[0]))
                reached("unload:link-detached")
    for cg, dr, pid in found:
        if cgroup.detach_id(cg, pid, dr, known.fd(pid)):
            detached.append((cg, dr))
            reached("unload:detached")
    if not present:
        if not detached:
            raise BackendError(f"unit {unit} is not loaded (no pins at {unit_dir(pin_root, unit)})")
        return detached
    with root.sub(key) as d:
        _clear_dir(d)
    try:
        root.rmdir(key)
    except KernelError as e:
        raise BackendError(f"could not remove {unit_dir(pin_root, unit)}: {e}") from None
    return detached


def pin_elsewhere(pin_root: str, unit: str, direction: str, path: str) -> str:
    """Pin the unit's program also at `path` (for IP*FilterPath= or systemd-run -p elsewhere);
    the unit is marked so that reloads, stats and unload look for its programs on every cgroup,
    since whoever uses that path is unknown to us. The pin the program was taken from."""
    with _locked(pin_root) as root, root.sub(unitkey.encode(unit)) as d:
        if not d.exists("counters"):
            raise BackendError(f"unit {unit} is not loaded completely (no pins at {d.path}); load it first")
        if not d.exists(MARK_ELSEWHERE):
            fd = d.get("counters")  # any object of the unit's: the pin is only a mark
            try:
                d.pin(fd, MARK_ELSEWHERE)
            finally:
                os.close(fd)
        fd = d.get(direction)
        try:
            pins.replace_pin(fd, path)
        finally:
            os.close(fd)
        return os.path.join(d.path, direction)


# -- attach / detach ----------------------------------------------------------

@contextmanager
def locked_unit_dir(pin_root: str, unit: str):
    """The unit's pin directory, checked, with the pin root locked (the watcher attaches here)."""
    with _locked(pin_root) as root:
        key = unitkey.encode(unit)
        if not root.exists(key):
            raise BackendError(f"unit {unit} is not loaded (no pins at {unit_dir(pin_root, unit)})")
        with root.sub(key) as d:
            yield d


def attach(pin_root: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    """Attach the unit's programs to a cgroup; {direction: newly attached}."""
    target = cgroup.resolve(cgroup_path)
    with _locked(pin_root) as root, PinnedUnit.open(pin_root, unit, root) as u:
        if not u.progs:
            raise BackendError(f"unit {unit} has no programs pinned")
        with root.sub(unitkey.encode(unit)) as d, UnitPrograms.of(pin_root, unit, d) as known:
            return attach_programs(d, target, u.progs, {dr: program_name(pin_root, unit, dr) for dr in u.progs},
                                   known)


def attach_programs(d: pins.PinDir, target: str, prog_fds: dict[str, int], names: dict[str, str],
                    known: UnitPrograms | None = None) -> dict[str, bool]:
    """Make the cgroup at `target` run exactly these programs of the unit whose pin directory is
    `d`, all or nothing: {direction: newly attached}. A stale program of the unit there is
    swapped in place, a duplicate removed; a new attachment is a link pinned in `d`.
    (The watcher calls this with fds it keeps open.)"""
    cgid = cgroup.cgroup_id(target)
    made: list[str] = []
    done: dict[str, bool] = {}
    try:
        for direction, fd in prog_fds.items():
            done[direction] = _ensure_attached(d, target, cgid, direction, fd, names[direction], made, known)
    except BaseException:
        for name in made:
            _drop_link(d, name)
        raise
    return done


def _ensure_attached(d, target: str, cgid: int, direction: str, fd: int, name: str, made: list,
                     known: UnitPrograms | None) -> bool:
    prog_id = progs.prog_info(fd).id
    ids = cgroup.query(target, direction)[1]
    if known is not None:
        stale = [pid for pid in ids if pid != prog_id and known.direction_of(pid) == direction]
    else:
        stale = [pid for pid in ids if pid != prog_id and name_of(pid) == name]
    fd_of = known.fd if known is not None else (lambda pid: None)
    lname = link_name(direction, cgid)
    newly = False
    if prog_id not in ids:
        if d.exists(lname) and _update_link(d, lname, fd):
            pass  # our link ran a stale program (a reload cut short): it runs this one now
        elif stale:
            if cgroup.replace_id(target, fd, stale[0], direction, fd_of(stale[0])):  # systemd's, an older bpfwall's
                stale.pop(0)
            else:
                newly = _new_link(d, target, direction, fd, lname, made)
        else:
            newly = _new_link(d, target, direction, fd, lname, made)
    for pid in stale:  # never two programs of one unit and direction on a cgroup
        cgroup.detach_id(target, pid, direction, fd_of(pid))
    return newly


def _new_link(d, target: str, direction: str, fd: int, lname: str, made: list) -> bool:
    d.unpin(lname)  # a detached link of ours (bpftool link detach): replaced by a live one
    lfd = cgroup.link(target, fd, direction)
    try:
        reached("attach:linked")
        d.pin(lfd, lname)
        made.append(lname)
        reached("attach:pinned")
    finally:
        os.close(lfd)  # pinned, it lives on; not pinned (a failure), it detaches now
    return True


def _update_link(d, lname: str, fd: int) -> bool:
    """Point our pinned link at `fd`; False if the link was detached (then it is unpinned)."""
    lfd = d.get(lname)
    try:
        links.update(lfd, fd, None, f"the link {d.path}/{lname}")
        return True
    except KernelError as e:
        if e.errno != errno.ENOLINK:
            raise
        d.unpin(lname)
        return False
    finally:
        os.close(lfd)


def _drop_link(d, lname: str) -> bool:
    """Detach and unpin one of our links; whether it was attached (False: none, or defunct)."""
    try:
        lfd = d.get(lname)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    try:
        live = not links.info(lfd).defunct
        links.detach(lfd)
    finally:
        os.close(lfd)
    d.unpin(lname)
    return live


def detach_programs(d, target: str, names: dict[str, str], directions=None,
                    known: UnitPrograms | None = None) -> list[str]:
    """Remove the unit (programs named `names`: direction → name) from the cgroup at `target`:
    its link and any program of it attached otherwise. The directions that were attached."""
    cgid = cgroup.cgroup_id(target)
    out = []
    for direction, name in names.items():
        if directions is not None and direction not in directions:
            continue
        gone = _drop_link(d, link_name(direction, cgid))
        for pid in cgroup.query(target, direction)[1]:
            ours = known.direction_of(pid) == direction if known is not None else name_of(pid) == name
            if ours:
                gone = cgroup.detach_id(target, pid, direction, known.fd(pid) if known else None) or gone
        if gone:
            out.append(direction)
    return out


def detach(pin_root: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    target = cgroup.resolve(cgroup_path)
    with _locked(pin_root) as root, PinnedUnit.open(pin_root, unit, root) as u:
        names = {dr: program_name(pin_root, unit, dr) for dr in DIRECTIONS}
        with root.sub(unitkey.encode(unit)) as d, UnitPrograms.of(pin_root, unit, d) as known:
            gone = detach_programs(d, target, names, known=known)
        return {dr: dr in gone for dr in u.progs}


# -- reading ------------------------------------------------------------------

def refresh_interfaces(pin_root: str) -> dict[str, int]:
    """Every loaded unit that names interfaces, its `ifaces` brought up to date with the devices
    now (after a link appeared, went or was renamed): {unit: devices that match}. Under the pin
    root's lock, so that it never writes a map a load is replacing."""
    found, cookie = netdev.devices(), netdev.netns_cookie()
    done = {}
    with _locked(pin_root) as root:
        for unit in units(pin_root):
            try:
                with PinnedUnit.open(pin_root, unit, root) as u:
                    if u.interfaces:
                        done[unit] = u.write_interfaces(found, cookie)
            except BackendError:
                continue  # a load cut short: the next load fills its map
    return done


def units(pin_root: str) -> list[str]:
    try:
        with pins.PinDir.open(pin_root) as root:
            names = [k for k in root.names() if root.is_dir(k) or os.path.islink(os.path.join(root.path, k))]
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return []
        if e.errno == errno.EACCES:
            raise BackendError(f"cannot read pin root {pin_root}: {e}"
                               + (" (bpfwall needs root)" if os.geteuid() != 0 else "")) from None
        raise
    return sorted(unitkey.decode(k) for k in names)


def _attachment(cg: str, direction: str, pid: int, current: dict[str, int]) -> dict:
    return {"cgroup": cg, "direction": direction, "program": pid, "current": pid == current.get(direction)}


@contextmanager
def unit_programs(pin_root: str, unit: str):
    """(UnitPrograms, where it can run) of the unit, read from its (checked) pins."""
    with open_root(pin_root) as root:
        key = unitkey.encode(unit)
        with root.sub(key) if root.exists(key) else _nothing() as d, UnitPrograms.of(pin_root, unit, d) as known:
            yield known, where_to_look(unit, d)


def stats(pin_root: str, unit: str) -> dict:
    with PinnedUnit.open(pin_root, unit) as u, unit_programs(pin_root, unit) as (known, where):
        ids = u.prog_ids()
        return {
            "unit": unit,
            "path": u.path,
            "mode": u.mode(),
            "ingress": u.meta["ingress"],
            "egress": u.meta["egress"],
            "compiler": u.meta["compiler"],
            "programs": ids,
            "counters": u.counters(),
            "events": u.events(),
            "params": u.params(),
            "sets": {name: u.set_elements(name) for name in sorted(u.meta["sets"])},
            "attached": [_attachment(cg, dr, pid, ids) for cg, dr, pid in sorted(_attached_anywhere(known, where))],
        }


def summary(pin_root: str) -> list[dict]:
    out = []
    for unit in units(pin_root):
        try:
            with PinnedUnit.open(pin_root, unit) as u:
                ids = u.prog_ids()
                out.append({"unit": unit, "mode": u.mode(), "ingress": u.meta["ingress"],
                            "egress": u.meta["egress"], "compiler": u.meta["compiler"], "programs": ids})
        except (BackendError, KernelError) as e:
            out.append({"unit": unit, "error": str(e), "programs": {}})
    with contextlib.ExitStack() as stack:
        index = [(entry, *stack.enter_context(unit_programs(pin_root, entry["unit"]))) for entry in out]
        everywhere = any(where is None for _, _, where in index)
        paths = None if everywhere else sorted({p for _, _, where in index for p in where})
        for entry in out:
            entry["attached"] = []

        def owner(pid: int):
            for entry, known, _ in index:
                if (dr := known.direction_of(pid)) is not None:
                    return entry, dr
            return None
        for cg, direction, pid in sorted(cgroup.find_attachments(lambda pid: owner(pid) is not None, paths)):
            entry, dr = owner(pid)
            if dr == direction:
                entry["attached"].append(_attachment(cg, direction, pid, entry["programs"]))
    return out


# -- BPF_PROG_TEST_RUN --------------------------------------------------------

class PacketTooLong(Error):
    """A packet the kernel will not test-run: longer than its test-run input limit."""

    def __init__(self, length: int, limit: int):
        self.length, self.limit = length, limit
        super().__init__(f"{length} bytes is over the kernel's test-run limit of {limit} bytes "
                         "(IP packet); not judged")


def test_run(program: UnitProgram, direction: str, packets: list[bytes], params: dict[str, int] | None = None,
             sets: dict[str, list] | None = None, cache=None, devices: list[str] | None = None) -> list:
    """Verdicts of the compiled program for raw L3 packets (True: pass), nothing pinned; a packet
    over the kernel's test-run limit gets a PacketTooLong instead, and the others are still run.
    `devices`: the name of the device each packet comes by (one of this network namespace's;
    default lo)."""
    params, sets = params or {}, sets or {}
    check_values(program, params, sets)
    index = {name: i for i, name in netdev.devices().items()}
    for name in devices or ():
        if name not in index:
            raise BackendError(f"no device {name!r} here (devices: {', '.join(sorted(index))})")
    obj = build(program, cache)
    loaded = loader.load(obj)
    try:
        unit = PinnedUnit("(test)", "", program.meta(), dict(loaded.maps), {})
        unit.write_params(params)
        for name, elements in sets.items():
            unit.replace_set(name, elements)
        unit.write_interfaces()
        fd = loaded.progs[PROG_SECTIONS[direction]]
        verdicts = []
        for i, data in enumerate(packets):
            eth = b"\0" * 12 + struct.pack("!H", ETH_P[data[0] >> 4])
            try:
                retval, _ = progs.prog_test_run(fd, eth + data, ifindex=index[devices[i]] if devices else 0)
            except KernelError as e:
                limit = progs.test_run_limit(fd, eth + data) if e.errno == errno.EINVAL else None
                if limit is None:
                    raise
                verdicts.append(PacketTooLong(len(data), limit - len(eth)))
                continue
            verdicts.append(retval == 1)
        return verdicts
    finally:
        loaded.close()

