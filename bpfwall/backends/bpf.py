"""The BPF backend: build → load → pin → attach, and everything read back from pins.

A unit's pins live in `<pin root>/<unit key>/`:

    ingress, egress      the programs (either may be absent)
    counters             per-CPU {packets, bytes}; index direction*2 + dropped
    mode                 u32: 0 enforce, 1 audit
    params               struct bpfwall_params: one u64 per $param, by name order
    set_<name>           @name: hash of u32 (numbers) or LPM trie (addresses)
    meta                 JSON: expressions, param order, set kinds, capacity

`meta` makes the pins self-describing, so stats/set/tune need nothing else.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import unitkey
from ..build import UnitProgram, build
from ..kernel import cgroup, loader, maps, pins, progs
from ..kernel.errors import KernelError
from ..lang.setcontents import Contents, count
from ..lang.values import PARAM_MAX, parse_set_elements
from ..lower.c import set_map

DIRECTIONS = ("ingress", "egress")
MODES = ("enforce", "audit")
DEFAULT_PIN_ROOT = "/sys/fs/bpf/bpfwall"
PROG_SECTIONS = {"ingress": "cgroup_skb/ingress", "egress": "cgroup_skb/egress"}
# Maps whose contents survive a reload when the new object's map is compatible.
KEPT_MAPS = ("counters", "mode")
ETH_P = {4: 0x0800, 6: 0x86DD}


class BackendError(Exception):
    """A request the backend refuses; the message is one line for the user."""


# -- value encodings shared with bpf/port_filter.c ----------------------------

def number_key(value: int) -> bytes:
    return struct.pack("=I", value)


def address_key(net) -> bytes:
    """struct bpfwall_addr_key: prefixlen counts the family byte (see port_filter.c)."""
    return struct.pack("=IB16s", 8 + net.prefixlen, net.version, net.network_address.packed)


def key_of(kind: str, value) -> bytes:
    return number_key(value) if kind == "number" else address_key(value)


def value_of(kind: str, key: bytes):
    """A set map's key back as the number or network it holds."""
    if kind == "number":
        return struct.unpack("=I", key)[0]
    plen, family, addr = struct.unpack("=IB16s", key)
    return ipaddress.ip_network((addr[:4] if family == 4 else addr, plen - 8))


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


@contextmanager
def _locked(pin_root: str):
    """Serialize changes to one pin root (two `load`s of one unit must not interleave)."""
    pins.ensure_bpffs(pin_root)
    fd = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- a loaded unit, opened from its pins --------------------------------------

@dataclass
class PinnedUnit:
    unit: str
    path: str
    meta: dict
    maps: dict[str, int] = field(default_factory=dict)
    progs: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, pin_root: str, unit: str) -> "PinnedUnit":
        path = unit_dir(pin_root, unit)
        if not os.path.isdir(path):
            raise BackendError(f"unit {unit} is not loaded (no pins at {path}); load it with: bpfwall load {unit} --ingress EXPR")
        self = cls(unit, path, {})
        try:
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name in DIRECTIONS:
                    self.progs[name] = pins.get(full)
                elif not name.startswith("tmp"):
                    self.maps[name] = pins.get(full)
            if "meta" not in self.maps:
                raise BackendError(f"{path} has no meta map: not a bpfwall unit, or one half-written; "
                                   f"remove it with: rm -r {path}")
            raw = maps.map_lookup(self.maps["meta"], struct.pack("=I", 0), maps.map_info(self.maps["meta"]).value_size)
            self.meta = json.loads(raw.split(b"\0", 1)[0])
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.progs.values()]:
            os.close(fd)
        self.maps.clear()
        self.progs.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def prog_ids(self) -> dict[str, int]:
        return {d: progs.prog_info(fd).id for d, fd in self.progs.items()}

    # params
    def params(self) -> dict[str, int]:
        names = self.meta["params"]
        if not names:
            return {}
        raw = maps.map_lookup(self.maps["params"], struct.pack("=I", 0), 8 * len(names))
        return dict(zip(names, struct.unpack(f"={len(names)}Q", raw)))

    def write_params(self, values: dict[str, int]) -> None:
        names = self.meta["params"]
        if names:
            raw = struct.pack(f"={len(names)}Q", *(values.get(n, 0) for n in names))
            maps.map_update(self.maps["params"], struct.pack("=I", 0), raw)

    # mode
    def mode(self) -> str:
        raw = maps.map_lookup(self.maps["mode"], struct.pack("=I", 0), 4)
        return MODES[struct.unpack("=I", raw)[0]] if raw else "enforce"

    def write_mode(self, mode: str) -> None:
        maps.map_update(self.maps["mode"], struct.pack("=I", 0), struct.pack("=I", MODES.index(mode)))

    # counters: per direction, summed over CPUs
    def counters(self) -> dict:
        fd = self.maps["counters"]
        size = maps.percpu_value_size(16)
        out = {}
        for i, direction in enumerate(DIRECTIONS):
            entry = {}
            for dropped, label in ((0, "pass"), (1, "drop")):
                raw = maps.map_lookup(fd, struct.pack("=I", i * 2 + dropped), size) or b""
                packets = byte_count = 0
                for off in range(0, len(raw), 16):
                    p, b = struct.unpack_from("=QQ", raw, off)
                    packets += p
                    byte_count += b
                entry[label] = {"packets": packets, "bytes": byte_count}
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
        fd = self.maps[set_map(name)]
        return list(maps.map_keys(fd, maps.map_info(fd).key_size))

    def set_contents(self, name: str) -> Contents:
        kind = self.set_kind(name)
        return Contents(kind, (value_of(kind, k) for k in self._set_keys(name)))

    def set_elements(self, name: str) -> list[str]:
        kind = self.set_kind(name)
        values = sorted((value_of(kind, k) for k in self._set_keys(name)),
                        key=(lambda v: v) if kind == "number" else (lambda n: (n.version, n)))
        return [str(v) for v in values]

    def replace_set(self, name: str, elements) -> None:
        self.write_set(name, Contents(self.set_kind(name), elements))

    def write_set(self, name: str, new: Contents) -> None:
        """Make @name hold exactly `new`, refused before the first write if it does not fit;
        if a write fails, the previous contents are put back before the error is raised."""
        kind = self.set_kind(name)
        fd = self.maps[set_map(name)]
        info = maps.map_info(fd)
        _check_fits(name, len(new), info.max_entries)
        old = list(maps.map_keys(fd, info.key_size))
        unwanted = [k for k in old if value_of(kind, k) not in new]
        have = set(old)
        wanted = (k for k in (key_of(kind, v) for v in new.values()) if k not in have)
        added: list[bytes] = []
        removed: list[bytes] = []
        try:
            if len(new) + len(unwanted) <= info.max_entries:  # old ∪ new fits
                # Room for the old and the new contents at once: add, then remove, so that
                # no element either of them allows is missing for a moment.
                _add_keys(fd, wanted, added)
                _delete_keys(fd, unwanted, removed)
            else:
                # No room for both: the elements that go are removed first, then the new ones
                # added. Elements kept across the change are never touched, so nothing the old
                # and the new contents both allow is missing for a moment.
                _delete_keys(fd, unwanted, removed)
                _add_keys(fd, wanted, added)
        except BaseException:
            _restore_keys(fd, added, removed)
            raise

    # all-or-nothing live changes (`bpfwall set`)
    def change(self, changes: list) -> list[str]:
        """Apply ("param", name, value), ("mode", m), ("set", name, "+"|"-"|"=", "E1,E2,…")
        all or nothing: every change is checked (params exist and are in range, sets exist,
        elements parse, each set fits its capacity after all its changes) before the first
        write; if a kernel write fails, what was written is put back. Messages of what was done."""
        old = _Values(self.params(), self.mode(), {})
        new, done = self._planned(changes, old)
        for name, contents in new.sets.items():
            _check_fits(name, len(contents), maps.map_info(self.maps[set_map(name)]).max_entries,
                        "; nothing was changed")
        self._write(old, new)
        return done

    def _planned(self, changes: list, old: "_Values") -> tuple["_Values", list[str]]:
        """The values after `changes` (sets as counted contents; `old.sets` gets the previous
        contents of each set changed); refuses the first change that is wrong."""
        new, done = _Values(dict(old.params), old.mode, {}), []
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
    """What `bpfwall set` changes: params, mode and (changed) sets' contents."""
    params: dict[str, int]
    mode: str
    sets: dict[str, Contents]


def _check_fits(name: str, n: int, capacity: int, note: str = "") -> None:
    if n > capacity:
        raise BackendError(f"set @{name} would hold {n} elements; its map holds {capacity} "
                           f"(reload with a larger --set-capacity){note}")


def _add_keys(fd: int, keys, added: list) -> None:
    for k in keys:
        maps.map_update(fd, k, b"\1")
        added.append(k)


def _delete_keys(fd: int, keys, removed: list) -> None:
    for k in keys:
        if maps.map_delete(fd, k):
            removed.append(k)


def _restore_keys(fd: int, added: list, removed: list) -> None:
    """Undo a partial write_set: drop what was added (making room), put back what was removed."""
    for k in added:
        try:
            maps.map_delete(fd, k)
        except KernelError:
            pass
    for k in removed:
        try:
            maps.map_update(fd, k, b"\1")
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
    """`bpfwall set`: PinnedUnit.change on the unit's pins."""
    with PinnedUnit.open(pin_root, unit) as u:
        return u.change(changes)


def load(pin_root: str, unit: str, program: UnitProgram, params: dict[str, int] | None = None,
         sets: dict[str, list] | None = None, mode: str | None = None, cache=None) -> LoadResult:
    """Build and pin `unit`'s programs; if it is loaded already, swap them in place everywhere."""
    params, sets = params or {}, sets or {}
    path = unit_dir(pin_root, unit)
    check_values(program, params, sets)
    obj = build(program, cache)
    with _locked(pin_root):
        # An empty directory (a load interrupted before its first pin) counts as not loaded.
        old = PinnedUnit.open(pin_root, unit) if os.path.isdir(path) and os.listdir(path) else None
        created_dir = old is None
        try:
            return _load_locked(path, unit, program, obj, params, sets, mode, old, created_dir)
        finally:
            if old is not None:
                old.close()


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


def _load_locked(path, unit, program, obj, params, sets, mode, old, created_dir) -> LoadResult:
    result = LoadResult(unit, path)
    reuse = _reusable(old, obj, program)
    loaded = loader.load(obj, reuse)
    try:
        if created_dir:
            os.makedirs(path, exist_ok=True)
        new = PinnedUnit(unit, path, program.meta(), dict(loaded.maps), {})
        new.progs = {d: loaded.progs[PROG_SECTIONS[d]] for d in DIRECTIONS
                     if getattr(program, d) is not None}
        # Contents: meta always; params carried over by name; sets as given or kept.
        meta_size = maps.map_info(new.maps["meta"]).value_size
        maps.map_update(new.maps["meta"], struct.pack("=I", 0), program.meta_bytes().ljust(meta_size, b"\0"))
        kept = old.params() if old is not None else {}
        if params or "params" not in reuse:
            new.write_params({**{n: v for n, v in kept.items() if n in program.params}, **params})
        if mode is not None:
            new.write_mode(mode)
        for name, elements in sets.items():
            new.replace_set(name, elements)
        result.reused_maps = sorted(reuse)

        # Swap the programs on every cgroup that runs the old ones (BPF_F_REPLACE: no gap).
        if old is not None:
            _swap_attachments(old, new, result)
        # Pins: maps first, then programs, each replaced atomically by rename.
        for name, fd in new.maps.items():
            if name not in reuse:
                pins.replace_pin(fd, os.path.join(path, name))
        for direction in DIRECTIONS:
            target = os.path.join(path, direction)
            if direction in new.progs:
                pins.replace_pin(new.progs[direction], target)
            elif pins.is_pinned(target):
                pins.unpin(target)
        if old is not None:
            for name in old.maps:
                if name not in new.maps:
                    pins.unpin(os.path.join(path, name))
        return result
    except BaseException:
        if created_dir:
            _remove_dir(path)
        raise
    finally:
        loaded.close()


def _swap_attachments(old: PinnedUnit, new: PinnedUnit, result: LoadResult) -> None:
    old_ids = old.prog_ids()
    by_id = {pid: d for d, pid in old_ids.items()}
    found = cgroup.find_attachments(set(by_id))
    cgroups = sorted({cg for cg, _, _ in found})
    done = []
    try:
        for cg, direction, pid in found:
            if direction in new.progs:
                cgroup.attach(cg, new.progs[direction], direction, replace_fd=old.progs[direction])
                done.append((cg, direction))
                result.replaced.append((cg, direction))
        # A direction the unit did not filter before now reaches its cgroups too.
        for direction, fd in new.progs.items():
            if direction not in old.progs:
                for cg in cgroups:
                    if cgroup.attach(cg, fd, direction):
                        result.attached.append((cg, direction))
    except BaseException:
        for cg, direction in done:  # put the old programs back where we swapped
            try:
                cgroup.attach(cg, old.progs[direction], direction, replace_fd=new.progs[direction])
            except KernelError:
                pass
        raise
    # A direction the new load no longer filters is detached.
    for cg, direction, pid in found:
        if direction not in new.progs:
            if cgroup.detach(cg, old.progs[direction], direction):
                result.detached.append((cg, direction))


def _remove_dir(path: str) -> None:
    try:
        for name in os.listdir(path):
            pins.unpin(os.path.join(path, name))
        os.rmdir(path)
    except (OSError, KernelError):
        pass


def unload(pin_root: str, unit: str) -> list:
    """Detach the unit's programs everywhere, then remove its pins."""
    with _locked(pin_root):
        with PinnedUnit.open(pin_root, unit) as u:
            detached = []
            ids = u.prog_ids()
            for cg, direction, pid in cgroup.find_attachments(set(ids.values())):
                if cgroup.detach(cg, u.progs[direction], direction):
                    detached.append((cg, direction))
            path = u.path
        _remove_dir(path)
        if os.path.isdir(path):
            raise BackendError(f"could not remove {path}: something else is pinned there")
    return detached


# -- attach / detach ----------------------------------------------------------

def attach(pin_root: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    """Attach the unit's programs to a cgroup; {direction: newly attached}."""
    target = cgroup.resolve(cgroup_path)
    with PinnedUnit.open(pin_root, unit) as u:
        if not u.progs:
            raise BackendError(f"unit {unit} has no programs pinned")
        return attach_programs(target, u.progs)


def attach_programs(target: str, prog_fds: dict[str, int]) -> dict[str, bool]:
    """Attach {direction: program fd} to the cgroup at `target`, all or nothing;
    {direction: newly attached}. (The watcher calls this with fds it keeps open.)"""
    done: dict[str, bool] = {}
    try:
        for direction, fd in prog_fds.items():
            done[direction] = cgroup.attach(target, fd, direction)
    except BaseException:
        for direction, new in done.items():
            if new:
                try:
                    cgroup.detach(target, prog_fds[direction], direction)
                except KernelError:
                    pass  # the cgroup vanished meanwhile: nothing left to undo
        raise
    return done


def detach(pin_root: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    target = cgroup.resolve(cgroup_path)
    with PinnedUnit.open(pin_root, unit) as u:
        return {d: cgroup.detach(target, fd, d) for d, fd in u.progs.items()}


# -- reading ------------------------------------------------------------------

def units(pin_root: str) -> list[str]:
    try:
        names = os.listdir(pin_root)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise BackendError(f"cannot read pin root {pin_root}: {e.strerror}"
                           + (" (bpfwall needs root)" if os.geteuid() != 0 else "")) from None
    return sorted(unitkey.decode(k) for k in names if os.path.isdir(os.path.join(pin_root, k)))


def attachments_of(prog_ids: dict[str, int]) -> list[dict]:
    found = cgroup.find_attachments(set(prog_ids.values()))
    return [{"cgroup": cg, "direction": d} for cg, d, _ in sorted(found)]


def stats(pin_root: str, unit: str) -> dict:
    with PinnedUnit.open(pin_root, unit) as u:
        ids = u.prog_ids()
        return {
            "unit": unit,
            "path": u.path,
            "mode": u.mode(),
            "ingress": u.meta["ingress"],
            "egress": u.meta["egress"],
            "programs": ids,
            "counters": u.counters(),
            "params": u.params(),
            "sets": {name: u.set_elements(name) for name in sorted(u.meta["sets"])},
            "attached": attachments_of(ids),
        }


def summary(pin_root: str) -> list[dict]:
    out = []
    for unit in units(pin_root):
        try:
            with PinnedUnit.open(pin_root, unit) as u:
                ids = u.prog_ids()
                out.append({"unit": unit, "mode": u.mode(), "ingress": u.meta["ingress"],
                            "egress": u.meta["egress"], "programs": ids})
        except (BackendError, KernelError) as e:
            out.append({"unit": unit, "error": str(e)})
    wanted = {pid: entry for entry in out for pid in entry.get("programs", {}).values()}
    for entry in out:
        entry["attached"] = []
    for cg, direction, pid in sorted(cgroup.find_attachments(set(wanted))):
        wanted[pid]["attached"].append({"cgroup": cg, "direction": direction})
    return out


# -- BPF_PROG_TEST_RUN --------------------------------------------------------

def test_run(program: UnitProgram, direction: str, packets: list[bytes], params: dict[str, int] | None = None,
             sets: dict[str, list] | None = None, cache=None) -> list[bool]:
    """Verdicts of the compiled program for raw L3 packets; nothing is pinned."""
    params, sets = params or {}, sets or {}
    check_values(program, params, sets)
    obj = build(program, cache)
    loaded = loader.load(obj)
    try:
        unit = PinnedUnit("(test)", "", program.meta(), dict(loaded.maps), {})
        unit.write_params(params)
        for name, elements in sets.items():
            unit.replace_set(name, elements)
        fd = loaded.progs[PROG_SECTIONS[direction]]
        verdicts = []
        for data in packets:
            eth = b"\0" * 12 + struct.pack("!H", ETH_P[data[0] >> 4])
            retval, _ = progs.prog_test_run(fd, eth + data)
            verdicts.append(retval == 1)
        return verdicts
    finally:
        loaded.close()

