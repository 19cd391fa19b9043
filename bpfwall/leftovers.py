"""Removing what dead `bpfwall run`s left behind: `bpfwall gc`, and the sweep every run starts with.

Only runs with a record (bpfwall/runrecord.py) whose lock is free — their bpfwall is dead — are
looked at, and only what the record names. For each, in this order:

1. Still running? If any cgroup of the run has processes — the one bpfwall made, or any cgroup
   the run's programs are attached to (systemd's scope) — the command outlived bpfwall.
   Everything stays, attached and policing, and gc says so: never unfilter a running process.
2. The cgroup bpfwall made is removed if it is still the one it made: a cgroup2 directory owned
   by us at the recorded path (a user who can write to the parent could have replaced it by one
   of their own). rmdir fails if a process moved in meanwhile; then everything stays.
3. The unit's pins are removed if their `meta` carries the run's token (a unit of the same name
   loaded by hand is not the run's): detached everywhere and unpinned, except on the systemd path,
   where the programs stay on the scope systemd attached them to (as after a normal run). A unit
   directory without `meta` is the run's own load cut short (bpf.load pins `meta` last, and the
   record reserved the name before the directory was made): bpf.unload removes it.
4. The record goes last, so a gc killed half-way is finished by the next one.
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass

from . import runrecord, unitkey
from .backends import bpf
from .kernel import syscall as sc
from .kernel.errors import KernelError

CUT_SHORT = "its load was cut short"


@dataclass
class Outcome:
    """One line of `bpfwall gc`: what was (or would be) removed, kept, or left alone and why."""
    action: str  # removed | would remove | kept | left alone | skipped
    what: str  # cgroup | pins | run | record
    path: str
    unit: str | None = None
    detail: str = ""

    def line(self) -> str:
        if self.what == "run":
            return f"{self.action} {self.unit}: {self.detail}"
        return f"{self.action} {self.what} {self.path} ({f'{self.unit}: ' if self.unit else ''}{self.detail})"

    def as_json(self) -> dict:
        return asdict(self)


# -- cgroups ------------------------------------------------------------------------

def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def populated(path: str) -> bool:
    """Whether the cgroup or one below it has a process; False once it is gone."""
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return any(line.split() == ["populated", "1"] for line in f)
    except FileNotFoundError:
        return False


def _not_ours(path: str) -> str | None:
    """Why the directory at `path` is not a cgroup this euid made, or None."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or sc.fs_magic(path) != sc.CGROUP2_SUPER_MAGIC:
        return "not a cgroup2 directory"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}: not the cgroup bpfwall made"
    return None


# -- pins -----------------------------------------------------------------------------

def _entries(pin_root: str, unit: str) -> list[str] | None:
    """The names in the unit's pin directory (checked fds), None when there is none."""
    try:
        root = bpf.open_root(pin_root)
    except bpf.BackendError:
        return None  # no pin root
    with root:
        key = unitkey.encode(unit)
        if not root.exists(key):
            return None
        with root.sub(key) as d:
            return d.names()


def remove_pins(pin_root: str, unit: str, detach: bool) -> None:
    """Remove the unit's pins; with `detach`, first detach its programs everywhere (bpf.unload)."""
    if detach:
        bpf.unload(pin_root, unit)
        return
    key = unitkey.encode(unit)
    with bpf.open_root(pin_root) as root:
        with root.sub(key) as d:
            for name in d.names():
                d.unpin(name)
        root.rmdir(key)


def _pins_of(pin_root: str, unit: str, token: str) -> str:
    """"absent", "ours", CUT_SHORT, or why the unit's pins are not the run's. Pins that cannot
    be read raise: undecided, they and the record stay."""
    entries = _entries(pin_root, unit)
    if entries is None:
        return "absent"
    if "meta" not in entries:
        # bpf.load pins `meta` last: this is the run's own load, cut short (the record
        # reserved the name before the directory was made).
        return CUT_SHORT
    with bpf.PinnedUnit.open(pin_root, unit) as u:
        return "ours" if u.meta.get("run") == token else "not loaded by this run"


def _attached_cgroups(pin_root: str, unit: str) -> set[str]:
    """Where the unit's programs run (found by their names, so also ones no pin names)."""
    return {a["cgroup"] for entry in bpf.summary(pin_root) if entry["unit"] == unit for a in entry["attached"]}


def left_behind(pin_root: str, rec: runrecord.Record) -> bool:
    """Whether something the record names is still there (so the record must stay)."""
    if rec.cgroup is not None and os.path.lexists(rec.cgroup):
        return True
    try:
        return _pins_of(pin_root, rec.unit, rec.token) in ("ours", CUT_SHORT)
    except (bpf.BackendError, KernelError, OSError):
        return True


# -- one dead run ------------------------------------------------------------------

def _collect_one(pin_root: str, dead: runrecord.DeadRun, dry_run: bool) -> tuple[list[Outcome], bool]:
    """What this dead run left, removed (unless dry_run); (outcomes, whether all of it is gone)."""
    rec = dead.record
    gone = f"its bpfwall, pid {rec.pid}, is gone"
    remove = "would remove" if dry_run else "removed"
    out: list[Outcome] = []
    pin_state = _pins_of(pin_root, rec.unit, rec.token)
    cgroups = _attached_cgroups(pin_root, rec.unit) if pin_state in ("ours", CUT_SHORT) else set()
    own = rec.cgroup if rec.cgroup is not None and os.path.lexists(rec.cgroup) else None
    if own is not None:
        why = _not_ours(own)
        if why:
            out.append(Outcome("left alone", "cgroup", own, rec.unit, why))
            own = None
        else:
            cgroups.add(own)
    busy = sorted(c for c in cgroups if populated(c))
    if busy:
        where = ", ".join(f"{c} (pids {' '.join(map(str, procs(c))) or 'below it'})" for c in busy)
        out.append(Outcome("kept", "run", busy[0], rec.unit,
                           f"{gone}, but its command still runs in {where} and stays filtered; "
                           "run `bpfwall gc` again after it exits"))
        return out, False
    if own is not None:
        if not dry_run:
            try:
                os.rmdir(own)
            except OSError as e:  # a process moved in, or a cgroup was made below it
                out.append(Outcome("kept", "run", own, rec.unit, f"{gone}, but its cgroup {own} "
                                   f"cannot be removed ({e.strerror}); its filters stay"))
                return out, False
        out.append(Outcome(remove, "cgroup", own, rec.unit, gone))
    path = bpf.unit_dir(pin_root, rec.unit)
    if pin_state in ("ours", CUT_SHORT):
        if not dry_run:
            remove_pins(pin_root, rec.unit, detach=rec.cgroup is not None)
        notes = [pin_state] if pin_state != "ours" else []
        out.append(Outcome(remove, "pins", path, rec.unit, "; ".join(notes + [gone])))
    elif pin_state != "absent":
        out.append(Outcome("left alone", "pins", path, rec.unit, pin_state))
    return out, True


def collect(pin_root: str, dry_run: bool = False) -> list[Outcome]:
    """Remove (or with dry_run, list) what the dead runs of this pin root left behind."""
    out: list[Outcome] = []
    for dead in runrecord.dead_runs(pin_root):
        if dead.held is None:
            out.append(Outcome("skipped", "record", dead.path, None, dead.problem))
            continue
        finished = False
        try:
            found, finished = _collect_one(pin_root, dead, dry_run)
            out += found
        except (bpf.BackendError, KernelError, OSError) as e:
            out.append(Outcome("kept", "run", dead.path, dead.record.unit,
                               f"cannot remove what it left: {getattr(e, 'strerror', None) or e}"))
        finally:
            dead.held.release(remove=finished and not dry_run)
    return out
