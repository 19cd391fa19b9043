"""The nftables backend: the same units, expressions, params, sets and modes as the
BPF backend, applied with `socket cgroupv2` verdict maps in one table of our own.

    load(table, unit, program, params=None, sets=None, mode=None, cache=None) -> LoadResult
    unload(table, unit) -> [(cgroup, direction)]
    attach(table, unit, cgroup_path) -> {direction: newly attached}
    detach(table, unit, cgroup_path) -> {direction: was attached}
    units(table) -> [unit]            stats(table, unit) -> dict     summary(table) -> [dict]
    set_values(table, unit, changes) -> [message]   (changes as the CLI parses them)
    explain(checked, direction, ...) -> nft text     restore(table) -> dict     destroy(table)

The state file (nft/state.py) is the truth; the table is rendered from it, each
change in one nft transaction (all or nothing) made under the state lock, and
the state is saved after nft accepted the change. Input is checked before the
first transaction. Nothing outside our table is ever touched.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from ..kernel import cgroup as cg
from ..kernel.errors import KernelError
from ..events import check_log_setting
from ..lang.checker import analyze_pair
from ..lang.errors import LangError
from ..lang.setcontents import contains, elements_intervals, subtract
from ..lang.values import parse_set_elements
from ..lower import nft as lower
from ..nft import layout
from ..nft.dump import cgroup_keys, chain_names, count_rules
from ..nft.errors import NftError
from ..nft.names import UnitNames, check_table, level_map
from ..nft import expr as X
from ..nft.records import Attachment, Known, NftState, Objects, SetRecord, UnitState
from ..nft.runner import runner
from ..nft.state import StateFile

DIRECTIONS = ("ingress", "egress")
MODES = ("enforce", "audit")
DEFAULT_TABLE = "bpfwall"


def default_table() -> str:
    return os.environ.get("BPFWALL_NFT_TABLE") or DEFAULT_TABLE


@dataclass
class LoadResult:
    unit: str
    table: str
    chains: dict = field(default_factory=dict)      # direction -> entry chain
    replaced: list = field(default_factory=list)    # (cgroup, direction) now filtered by the new rules
    attached: list = field(default_factory=list)    # (cgroup, direction) newly filtered
    detached: list = field(default_factory=list)    # (cgroup, direction) no longer filtered


# -- set contents as stored: strings -----------------------------------------------------

def _store_numbers(elements) -> list[str]:
    return [str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in elements_intervals(elements)]


def _store(kind: str, elements) -> list[str]:
    if kind == "number":
        return _store_numbers(elements)
    return list(dict.fromkeys(str(n) for n in elements))


def _parse(name: str, kind: str, stored: list[str]) -> list:
    return parse_set_elements(name, kind, ",".join(stored))


def _subtract(kind: str, stored: list[str], name: str, removed) -> tuple[list[str], int]:
    """Stored contents minus `removed`; how many of the removed were there."""
    if kind == "address":
        gone = {str(n) for n in removed}
        kept = [s for s in stored if s not in gone]
        return kept, len(stored) - len(kept)
    have = elements_intervals(_parse(name, kind, stored))
    hits = sum(1 for e in removed if contains(have, e if isinstance(e, int) else e[0]))
    return _store_numbers(subtract(have, elements_intervals(removed))), hits


# -- cgroups -----------------------------------------------------------------------------

def _relative(path: str) -> str:
    mount = cg.cgroup2_mount()
    if os.path.isabs(path) and (path == mount or path.startswith(mount + "/")):
        path = os.path.relpath(path, mount)
    return os.path.normpath(path.lstrip("/"))


def _resolve(path: str) -> tuple[str, str, int, int]:
    """(absolute path, path relative to the cgroup2 root, level, cgroup id) of an existing cgroup."""
    try:
        absolute = cg.resolve(path)
        cid = cg.cgroup_id(absolute)
    except KernelError as e:
        raise NftError(str(e)) from None
    rel = os.path.relpath(absolute, cg.cgroup2_mount())
    if rel == ".":
        raise NftError("cannot attach to the cgroup2 root itself: name a cgroup below it")
    return absolute, rel, rel.count("/") + 1, cid


def alive(record: Attachment, mount: str | None = None) -> bool:
    """Whether the attachment's cgroup still exists (`mount`: the cgroup2 mount, when the caller
    checks many: reading mountinfo costs more than the stat)."""
    try:
        return os.stat(os.path.join(mount or cg.cgroup2_mount(), record.cgroup)).st_ino == record.id
    except OSError:
        return False


# -- rendering -----------------------------------------------------------------------------

def _checked(ustate: UnitState) -> dict:
    try:
        pair = analyze_pair(ustate.ingress, ustate.egress)
    except LangError as e:
        raise NftError(f"stored expression no longer valid: {e}") from None
    return {d: c for d, c in zip(DIRECTIONS, pair, strict=False) if c is not None}


def _render(unit: str, ustate: UnitState, group: int, checked: dict | None = None) -> dict:
    """The unit's objects: {"chains": {name: rules}, "sets": {name: (type, elements)},
    "counters": [...], "entry": {direction: chain}}; its drop events go to nflog group `group`.
    Raises NftError before anything changes."""
    names = UnitNames(unit)
    checked = checked or _checked(ustate)
    sets = {n: _parse(n, s.kind, s.elements) for n, s in ustate.sets.items()}
    out = {"chains": {}, "sets": {}, "counters": [], "entry": {}}
    log = lower.Log(group, ustate.log_rate, ustate.log_burst)
    kinds = ("pass", "drop", "lost") if ustate.log_rate else ("pass", "drop")
    for direction, c in checked.items():
        low = lower.lower(c.expr, direction, names, ustate.mode, ustate.params, sets, log)
        for name in low.chains.names:
            out["chains"][name] = low.chains.rules[name]
        if ustate.strict:  # first the hold: what the watcher has not classified yet is dropped
            entry = names.chain(direction)
            out["chains"][entry] = [[X.jump(names.held_chain(direction))]] + list(out["chains"][entry])
        for nft_name, (set_name, key_type) in low.sets.items():
            out["sets"][nft_name] = (lower.SET_TYPES[key_type], lower.set_elements(key_type, sets[set_name]))
        out["counters"] += [names.counter(direction, v) for v in kinds]
        out["entry"][direction] = names.chain(direction)
    return out


def _levels(units) -> set[tuple[str, int]]:
    """The (direction, level) pairs the units (UnitState values) are attached at."""
    return {(d, a.level) for u in units for a in u.attached for d in a.directions}


def _elements_of_level(state: NftState, direction: str, level: int) -> list[tuple[str, str]]:
    out, mount = [], cg.cgroup2_mount()
    for unit, u in state.units.items():
        for a in u.attached:
            if a.level == level and direction in a.directions and alive(a, mount):
                out.append((a.cgroup, UnitNames(unit).chain(direction)))
    return out


def _records_of_level(state: NftState, direction: str, level: int) -> dict[int, Attachment]:
    return {a.id: a for u in state.units.values() for a in u.attached
            if a.level == level and direction in a.directions}


def _prune_vanished(state: NftState) -> None:
    mount = cg.cgroup2_mount()
    for u in state.units.values():
        u.attached = [a for a in u.attached if alive(a, mount)]
        _prune_vanished_known(u, mount)


def _held_text(table: str, unit: str, u: UnitState) -> str:
    return layout.held_text(table, UnitNames(unit), u.directions, layout.held_levels(u.known))


def _with_ancestors(rel: str, mount: str) -> list[Known]:
    """Known records of a cgroup (relative to the root) and every ancestor below the root; one
    removed meanwhile is left out (with what is below it: nothing there can send)."""
    parts = rel.split("/")
    out = []
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        try:
            out.append(Known(path, os.stat(os.path.join(mount, path)).st_ino))
        except OSError:
            break
    return out


def _learn(u: UnitState, records: list[Known]) -> list[Known]:
    """Add the records the unit does not know yet (by cgroup id); the ones added."""
    have = {k.id for k in u.known}
    new = [k for k in records if k.id not in have]
    u.known += new
    return new


# -- health and restore ---------------------------------------------------------------------

def _live_chains(table: str) -> set[str] | None:
    """Names of the chains of our table, or None when the table does not exist."""
    out = runner().json([{"list": {"chains": {"family": "inet"}}}], "listing chains")
    found, exists = set(), False
    for item in (out or {}).get("nftables", []):
        chain = item.get("chain")
        if chain and chain.get("table") == table:
            found.add(chain["name"])
            exists = True
    if not exists:
        tables = runner().json([{"list": {"tables": {"family": "inet"}}}], "listing tables")
        exists = any(t.get("table", {}).get("name") == table for t in (tables or {}).get("nftables", []))
    return found if exists else None


def healthy(table: str, state: NftState, live: set | None = None, deep=False) -> bool:
    """Every chain the state says we rendered (and every level's base chain) exists, and every
    attachment's map element (`live`: the table's chains, when the caller listed them
    already). `deep` also counts
    rules, of every chain (True) or of the chains named (a set): `nft flush table`/`flush
    chain` leave the chains but empty them, which would let every packet through."""
    if not state.units:
        return True
    live = chain_names(table) if live is None else live
    if not live:
        return False
    levels = _levels(state.units.values())
    expected = {layout.base_chain(d, level): 1 for d, level in levels}  # the level's one rule
    for d in {d for d, _ in levels}:  # a jump per level in the dispatch
        expected[layout.dispatch_chain(d)] = sum(1 for e, _ in levels if e == d)
    for unit, u in state.units.items():
        for chain in u.objects.chains:
            expected[chain] = u.objects.rules.get(chain)
        if u.strict:
            for d in u.directions:
                expected[UnitNames(unit).held_chain(d)] = len(layout.held_levels(u.known))
    if not set(expected) <= live:
        return False
    mount = None
    for direction, level in levels:  # every attachment's element (cheap: a netlink dump)
        keys = cgroup_keys(table, level_map(direction, level))
        if keys is None:
            return False
        missing = [a for cid, a in _records_of_level(state, direction, level).items() if cid not in keys]
        if missing:  # fine for vanished cgroups only (a refilled map leaves them out)
            mount = mount or cg.cgroup2_mount()
            if any(alive(a, mount) for a in missing):
                return False
    if not deep:
        return True
    check = set(expected) if deep is True else set(deep) & set(expected)
    if len(check) > 4:  # one dump of the whole table is cheaper than a dump per chain
        rules = count_rules(table)
    else:
        rules = {}
        for chain in check:
            rules.update(count_rules(table, chain))
    for chain in check:
        have, want = rules.get(chain, 0), expected[chain]
        if have == 0 or (want is not None and have != want):
            return False
    return True


def _rebuild(table: str, state: NftState) -> None:
    """Delete our table (if any) and render it again from the state, all in one transaction;
    then the dispatch rules (nft syntax)."""
    _prune_vanished(state)
    cmds = []
    if _live_chains(table) is not None:
        cmds.append(layout.delete_table(table))
    cmds.append(layout.add_table(table))
    if any(u.strict for u in state.units.values()):  # the holds first: the entry chains jump to them
        runner().json(cmds, f"restoring table inet {table}")
        cmds = []
        runner().text("".join(_held_text(table, unit, u) for unit, u in state.units.items() if u.strict),
                      f"restoring the holds of table inet {table}")
    for unit, u in state.units.items():
        if u.strict and u.known:
            cmds.append(layout.known_elements(table, UnitNames(unit), [k.cgroup for k in u.known]))
        rendered = _render(unit, u, state.log_group)
        cmds += layout.render_unit(table, rendered, Objects())
        u.objects = layout.objects_of(rendered)
    levels = sorted(_levels(state.units.values()))
    for direction, level in levels:
        cmds += layout.add_level(table, direction, level)
        pairs = _elements_of_level(state, direction, level)
        if pairs:
            cmds.append(layout.add_elements(table, direction, level, pairs))
    runner().json(cmds, f"restoring table inet {table}")
    if levels:
        runner().text("".join(layout.level_rule_text(table, d, level) for d, level in levels),
                      f"restoring the level rules of table inet {table}")
        dispatch = []
        for direction in sorted({d for d, _ in levels}):
            dispatch += [layout.add_dispatch(table, direction)]
            dispatch += layout.dispatch(table, direction, [lv for d, lv in levels if d == direction])
        runner().json(dispatch, f"restoring the dispatch of table inet {table}")


def _ensure(table: str, state: NftState) -> set:
    """Restore the table when it is missing or damaged; the names of its chains now (the
    state lock is held, so they stay valid for the caller's change)."""
    live = _live_chains(table)
    if live is not None and healthy(table, state, live):
        return live
    if not state.units:
        return live or set()
    _rebuild(table, state)
    return _live_chains(table) or set()


def restore(table: str) -> dict:
    """Rebuild the table from the state file (under its lock); what was restored."""
    with _changing(table) as (sf, state, _):
        _rebuild(table, state)
        sf.save(state)
    return {"table": table, "units": sorted(state.units), "attached": attachments(state)}


def attachments(state: NftState) -> int:
    """How many cgroups the state's units are attached to."""
    return sum(len(u.attached) for u in state.units.values())


def restore_if_needed(table: str, deep=False) -> bool:
    """The guard's check: restore the table if something removed (part of) it; `deep` counts
    rules too, of every chain (True) or of the chains named (after events that removed rules)."""
    sf = StateFile(table)
    with sf.locked():
        state = sf.load()
        if healthy(table, state, deep=deep):
            return False
        _rebuild(table, state)
        sf.save(state)
        return True


# -- load / unload -----------------------------------------------------------------------------

@contextmanager
def _changing(table: str, unit: str | None = None):
    """The state under its lock (and the unit's entry, which must exist); saved by the caller."""
    check_table(table)
    sf = StateFile(table)
    with sf.locked():
        state = sf.load()
        yield sf, state, (_unit(state, table, unit) if unit is not None else None)


def _unit(state: NftState, table: str, unit: str) -> UnitState:
    u = state.units.get(unit)
    if u is None:
        raise NftError(f"unit {unit} is not loaded in nft table inet {table}; load it with: "
                       f"bpfwall --backend nft load {unit} --ingress EXPR")
    return u


def _check_values(program, params: dict, sets: dict) -> None:
    for name in params:
        if name not in program.params:
            have = ", ".join("$" + p for p in program.params) or "none"
            raise NftError(f"--param {name}: the filter has no parameter ${name} (its params: {have})")
    for name in sets:
        if name not in program.sets:
            have = ", ".join("@" + s for s in sorted(program.sets)) or "none"
            raise NftError(f"--set {name}: the filter has no set @{name} (its sets: {have})")


def _log_settings(log: dict) -> dict:
    """{"log_rate": N, "log_burst": N} (either may be left out), checked; NftError naming a bad one."""
    out = {}
    for key, value in log.items():
        if value is None:
            continue
        if key not in ("log_rate", "log_burst"):
            raise NftError(f"unknown event setting {key}")
        try:
            out[key] = check_log_setting(key, value)
        except ValueError as e:
            raise NftError(str(e)) from None
    return out


def check_log_group(group: int | None) -> int | None:
    if group is not None and (type(group) is not int or not 0 <= group <= 65535):
        raise NftError(f"--log-group {group}: expected an nflog group 0..65535")
    return group


def load(table: str, unit: str, program, params: dict | None = None, sets: dict | None = None,
         mode: str | None = None, cache=None, log_rate: int | None = None, log_burst: int | None = None,
         log_group: int | None = None, strict: bool = False) -> LoadResult:
    """Render `unit`'s filters into the table; if it is loaded, replace them in one transaction
    (its attachments keep working, counters, params, mode, event settings and compatible sets
    are kept). A `log_group` other than the table's moves every unit's events to it. `strict`
    (a strict slice default): packets of cgroups below its slices that are not known (the
    watcher classifies them: classify()) are dropped before the filter runs."""
    check_table(table)
    names = UnitNames(unit)  # validates the unit name
    params, sets = dict(params or {}), dict(sets or {})
    _check_values(program, params, sets)
    if mode is not None and mode not in MODES:
        raise NftError(f"mode {mode!r}: mode is enforce or audit")
    log = _log_settings({"log_rate": log_rate, "log_burst": log_burst})
    check_log_group(log_group)
    sf = StateFile(table)
    with sf.locked():
        state = sf.load()
        live = _ensure(table, state)
        regroup = log_group is not None and log_group != state.log_group
        if regroup:
            state.log_group = log_group
        old = state.units.get(unit)
        new = UnitState(
            program.ingress.text if program.ingress is not None else None,
            program.egress.text if program.egress is not None else None,
            {n: params.get(n, old.params.get(n, 0) if old else 0) for n in program.params},
            mode or (old.mode if old else "enforce"),
            objects=old.objects if old else Objects(),
            attached=old.attached if old else [])
        if old:
            new.log_rate, new.log_burst = old.log_rate, old.log_burst
        new.strict = bool(strict)
        new.known = list(old.known) if old and old.strict and strict else []
        for key, value in log.items():
            setattr(new, key, value)
        for name, kind in program.sets.items():
            if name in sets:
                elements = _store(kind, sets[name])
            elif old and name in old.sets and old.sets[name].kind == kind:
                elements = old.sets[name].elements
            else:
                elements = []
            new.sets[name] = SetRecord(kind, elements)
        checked = {d: c for d, c in (("ingress", program.ingress), ("egress", program.egress)) if c is not None}
        rendered = _render(unit, new, state.log_group, checked)
        result = LoadResult(unit, table, dict(rendered["entry"]))

        before = set(old.directions) if old else set()
        after = set(checked)
        state.units[unit] = new
        vanished = [a for a in new.attached if not alive(a)]
        new.attached = [a for a in new.attached if alive(a)]
        cmds = [layout.add_table(table)] + _element_removals(table, state, vanished)
        for a in new.attached:
            for d in sorted(before - after):
                cmds.append(layout.delete_elements(table, d, a.level, [a.cgroup]))
                result.detached.append((a.cgroup, d))
        cmds += layout.render_unit(table, rendered, new.objects)
        for other, o in state.units.items() if regroup else ():
            if other != unit and o.log_rate:
                moved = _render(other, o, state.log_group)
                cmds += layout.render_unit(table, moved, o.objects)
                o.objects = layout.objects_of(moved)
        new_levels = set()
        if new.strict:  # the slices it sits on, and their ancestors, are known from the start
            mount = cg.cgroup2_mount()
            for a in new.attached:
                learned = _learn(new, _with_ancestors(a.cgroup, mount))
                if learned:
                    cmds.append(layout.known_elements(table, names, [k.cgroup for k in learned]))
        # an old hold's chains no longer jumped to (and its set, when the unit is no longer strict)
        held_gone = layout.remove_held(table, names, sorted(set(old.directions) - (after if new.strict else set())),
                                       with_set=not new.strict) if old and old.strict else []
        for a in new.attached:
            for d in sorted(after):
                where = (os.path.join(cg.cgroup2_mount(), a.cgroup), d)
                if d in before:
                    result.replaced.append(where)
                    continue
                result.attached.append(where)
                new_levels.add((d, a.level))
                cmds.append(layout.add_elements(table, d, a.level, [(a.cgroup, names.chain(d))]))
            a.directions = sorted(after)
        result.detached = [(os.path.join(cg.cgroup2_mount(), c), d) for c, d in result.detached]
        new.objects = layout.objects_of(rendered)
        cmds += held_gone  # after the entry chains stopped jumping to them
        with sf.recording(state):
            if new.strict:  # the hold exists before an entry chain jumps to it
                runner().text(_held_text(table, unit, new), f"loading {unit}")
            _apply(table, state, live, cmds, new_levels - _levels_without(state, unit), f"loading {unit}")
    return result


def _levels_without(state: NftState, unit: str) -> set:
    return _levels(u for n, u in state.units.items() if n != unit)


def _live_levels(live: set) -> set[tuple[str, int]]:
    levels = set()
    for name in live:
        for direction in DIRECTIONS:
            prefix = layout.base_chain(direction, 0)[:-1]
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                levels.add((direction, int(name[len(prefix):])))
    return levels


def _apply(table: str, state: NftState, live: set, cmds: list, new_levels, what: str) -> None:
    """Create the levels `new_levels` (nft syntax: their chain's rule), then run `cmds` in one
    JSON transaction that also makes the dispatch jump to exactly the levels in use, deepest
    first, and removes levels nothing is attached at any more. If that transaction fails, the
    levels just created are removed again (nothing jumps to them)."""
    for direction, level in sorted(new_levels):
        runner().text(layout.level_text(table, direction, level), what)
    in_use = _levels(state.units.values())
    gone = sorted(_live_levels(live) - in_use - set(new_levels))
    for direction in sorted({d for d, _ in set(new_levels) | set(gone)}):
        cmds += layout.dispatch(table, direction, [lv for d, lv in in_use if d == direction])
    for direction, level in gone:
        cmds.append(layout.flush_map(table, direction, level))
        cmds += layout.remove_level(table, direction, level)
    try:
        runner().json(cmds, what)
    except NftError:
        for direction, level in sorted(new_levels):
            try:
                runner().json(layout.remove_level(table, direction, level), "undoing a new level")
            except NftError:
                pass
        raise


def unload(table: str, unit: str) -> list:
    """Detach the unit everywhere and remove its objects; the table goes with the last unit."""
    with _changing(table, unit) as (sf, state, u):
        live = _ensure(table, state)
        detached = [(os.path.join(cg.cgroup2_mount(), a.cgroup), d) for a in u.attached for d in a.directions]
        del state.units[unit]
        with sf.recording(state):
            if not state.units:
                if _live_chains(table) is not None:
                    runner().json([layout.delete_table(table)], f"unloading {unit}")
            else:
                cmds = _element_removals(table, state, u.attached)
                cmds += layout.remove_unit_objects(table, u.objects)
                if u.strict:
                    cmds += layout.remove_held(table, UnitNames(unit), u.directions)
                _apply(table, state, live, cmds, set(), f"unloading {unit}")
    return detached


def _element_removals(table: str, state: NftState, records: list[Attachment]) -> list:
    """Delete the map elements of `records` (already out of the state): by path when the cgroup
    is the one we attached, else (it vanished) by refilling its level's map from the state."""
    cmds, refill = [], set()
    for a in records:
        for d in a.directions:
            if alive(a):
                cmds.append(layout.delete_elements(table, d, a.level, [a.cgroup]))
            else:
                refill.add((d, a.level))
    for d, level in sorted(refill):
        cmds.append(layout.flush_map(table, d, level))
        pairs = _elements_of_level(state, d, level)
        if pairs:
            cmds.append(layout.add_elements(table, d, level, pairs))
    return cmds


# -- attach / detach ---------------------------------------------------------------------------

def attach(table: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    """Filter the sockets of a cgroup (and its descendants) with the unit; {direction: newly}."""
    with _changing(table, unit) as (sf, state, u):
        directions = u.directions
        absolute, rel, level, cid = _resolve(cgroup_path)
        for a in u.attached:
            if a.cgroup == rel and a.id == cid:
                return {d: False for d in directions}
        for other, o in state.units.items():
            for a in o.attached:
                shared = set(a.directions) & set(directions)
                if other != unit and a.cgroup == rel and shared and alive(a):
                    raise NftError(f"cgroup {absolute} already has unit {other} attached ({', '.join(sorted(shared))}); "
                                   "the nft backend filters a cgroup with one unit: detach it first")
        stale = [a for a in u.attached if a.cgroup == rel]
        u.attached = [a for a in u.attached if a.cgroup != rel]
        cmds = _element_removals(table, state, stale)
        names = UnitNames(unit)
        for d in directions:
            cmds.append(layout.add_elements(table, d, level, [(rel, names.chain(d))]))
        new_levels = {(d, level) for d in directions} - _levels(state.units.values())
        record = Attachment(rel, level, cid, directions)
        if u.strict:  # the slice and its ancestors are known: its own sockets are judged, not held
            learned = _learn(u, _with_ancestors(rel, cg.cgroup2_mount()))
            if learned:
                cmds.insert(0, layout.known_elements(table, names, [k.cgroup for k in learned]))
                runner().text(_held_text(table, unit, u), f"attaching {unit} to {absolute}")
        what = f"attaching {unit} to {absolute}"
        # The watcher's hot path: no health check first (an attach only adds, so no level can
        # empty). If the table was damaged the transaction fails: restore, then run it again.
        u.attached.append(record)
        with sf.recording(state):
            try:
                _apply(table, state, set(), list(cmds), new_levels, what)
            except NftError:
                if not alive(record):
                    raise NftError(f"no such cgroup: {absolute} (it vanished while being attached)") from None
                u.attached.remove(record)
                if healthy(table, state):
                    raise
                _rebuild(table, state)
                u.attached.append(record)
                _apply(table, state, set(), cmds, new_levels, what)
    return {d: True for d in directions}


def detach(table: str, unit: str, cgroup_path: str) -> dict[str, bool]:
    """Stop filtering a cgroup with the unit; works for a cgroup that vanished meanwhile."""
    with _changing(table, unit) as (sf, state, u):
        rel = _relative(cgroup_path)
        records = [a for a in u.attached if a.cgroup == rel]
        if not records:
            _resolve(cgroup_path)  # a cgroup that does not exist is an error, as with the BPF backend
            return {d: False for d in u.directions}
        live = _ensure(table, state)
        u.attached = [a for a in u.attached if a.cgroup != rel]
        with sf.recording(state):
            _apply(table, state, live, _element_removals(table, state, records), set(), f"detaching {unit}")
    return {d: any(d in a.directions for a in records) for d in u.directions}


# -- a strict slice default's known cgroups ----------------------------------------------------

def classify(table: str, unit: str, cgroup_path: str) -> bool:
    """The watcher has classified this cgroup below the strict unit's slice: its packets that
    reach the default are judged by it from now on, no longer held. Whether it was new."""
    with _changing(table, unit) as (sf, state, u):
        if not u.strict:
            return False
        _, rel, _, cid = _resolve(cgroup_path)
        deeper = layout.held_levels(u.known + [Known(rel, cid)]) != layout.held_levels(u.known)
        learned = _learn(u, [Known(rel, cid)])
        if not learned:
            return False
        with sf.recording(state):
            if deeper:  # one more level to look at: its cgroups are held until they are known too
                runner().text(_held_text(table, unit, u), f"classifying {cgroup_path} for {unit}")
            runner().json([layout.known_elements(table, UnitNames(unit), [rel])],
                          f"classifying {cgroup_path} for {unit}")
    return True


def _refill_known(table: str, unit: str, u: UnitState, what: str) -> None:
    """Make the unit's known set hold exactly its live records (a vanished cgroup's element can
    only be dropped so: nft names elements by path)."""
    _prune_vanished_known(u)
    names = UnitNames(unit)
    cmds = [layout.flush_known(table, names)]
    if u.known:
        cmds.append(layout.known_elements(table, names, [k.cgroup for k in u.known]))
    runner().json(cmds, what)


def _prune_vanished_known(u: UnitState, mount: str | None = None) -> None:
    mount = mount or cg.cgroup2_mount()
    u.known = [k for k in u.known if alive(k, mount)]


def unclassify(table: str, unit: str, cgroup_id: int) -> bool:
    """Forget a cgroup (removed, or no longer below the unit's slices); whether it was known."""
    with _changing(table, unit) as (sf, state, u):
        if not any(k.id == cgroup_id for k in u.known):
            return False
        u.known = [k for k in u.known if k.id != cgroup_id]
        with sf.recording(state):
            _refill_known(table, unit, u, f"forgetting cgroup {cgroup_id} for {unit}")
    return True


def keep_known(table: str, unit: str, paths: dict[int, str]) -> list[int]:
    """After the watcher's full rescan: the unit knows exactly these cgroups ({id: path}) and its
    slices with their ancestors; the ids it forgot."""
    with _changing(table, unit) as (sf, state, u):
        if not u.strict:
            return []
        mount = cg.cgroup2_mount()
        keep = {k.id: k for a in u.attached for k in _with_ancestors(a.cgroup, mount)}
        for cid, path in paths.items():
            keep.setdefault(cid, Known(os.path.relpath(path, mount), cid))
        forgot = [k.id for k in u.known if k.id not in keep]
        u.known = list(keep.values())
        with sf.recording(state):
            runner().text(_held_text(table, unit, u), f"rescanning what {unit} knows")
            _refill_known(table, unit, u, f"rescanning what {unit} knows")
    return forgot


# -- live changes --------------------------------------------------------------------------------

def set_values(table: str, unit: str, changes: list) -> list[str]:
    """Apply `changes` to a loaded unit in one transaction, all or nothing:
    ("param", name, value), ("mode", "enforce"|"audit"), ("set", name, "+"|"-"|"=", "E1,E2,…"),
    ("log_rate", N), ("log_burst", N)."""
    with _changing(table, unit) as (sf, state, u):
        new = replace(u, params=dict(u.params), sets={n: replace(s) for n, s in u.sets.items()})
        done = []
        for change in changes:
            kind = change[0]
            if kind == "param":
                _, name, value = change
                if name not in new.params:
                    have = ", ".join("$" + p for p in sorted(new.params)) or "none"
                    raise NftError(f"unit {unit} has no parameter ${name} (its params: {have})")
                new.params[name] = value
                done.append(f"${name} = {value}")
            elif kind == "mode":
                if change[1] not in MODES:
                    raise NftError(f"mode={change[1]}: mode is enforce or audit")
                new.mode = change[1]
                done.append(f"mode = {change[1]}")
            elif kind in ("log_rate", "log_burst"):
                setattr(new, kind, _log_settings({kind: change[1]})[kind])
                done.append(f"{kind} = {change[1]}")
            elif kind == "set":
                _, name, op, raw = change
                if name not in new.sets:
                    have = ", ".join("@" + s for s in sorted(new.sets)) or "none"
                    raise NftError(f"unit {unit} has no set @{name} (its sets: {have})")
                s = new.sets[name]
                try:
                    elements = parse_set_elements(name, s.kind, raw) if isinstance(raw, str) else list(raw)
                except LangError as e:
                    raise NftError(str(e)) from None
                if op == "+":
                    s.elements = _store(s.kind, _parse(name, s.kind, s.elements) + elements)
                    done.append(f"@{name}: added {len(elements)}")
                elif op == "-":
                    s.elements, hits = _subtract(s.kind, s.elements, name, elements)
                    done.append(f"@{name}: removed {hits}")
                elif op == "=":
                    s.elements = _store(s.kind, elements)
                    done.append(f"@{name}: replaced, {len(s.elements)} element(s)")
                else:
                    raise NftError(f"@{name}{op}: write @set+ELEMENTS, @set-ELEMENTS or @set=ELEMENTS")
            elif kind == "interfaces":
                done.append("interfaces: nft matches device names itself (iifname/oifname); nothing to do")
            else:
                raise NftError(f"unknown change {change!r}")
        rendered = _render(unit, new, state.log_group)
        _ensure(table, state)
        new.objects = layout.objects_of(rendered)
        state.units[unit] = new
        with sf.recording(state):
            runner().json(layout.render_unit(table, rendered, u.objects), f"changing {unit}")
    return done


# -- reading --------------------------------------------------------------------------------------

def units(table: str) -> list[str]:
    check_table(table)
    return sorted(StateFile(table).load().units)


def counter_values(table: str) -> dict[str, dict]:
    try:
        out = runner().json([{"list": {"counters": {"family": "inet", "table": table}}}], "listing counters")
    except NftError:
        return {}  # no table (yet, or flushed and not restored): nothing counted
    return {c["counter"]["name"]: {"packets": c["counter"]["packets"], "bytes": c["counter"]["bytes"]}
            for c in (out or {}).get("nftables", []) if "counter" in c}


def _attached(u: UnitState) -> list[dict]:
    mount = cg.cgroup2_mount()
    return [{"cgroup": os.path.join(mount, a.cgroup), "direction": d}
            for a in sorted(u.attached, key=lambda a: a.cgroup) for d in a.directions]


def stats(table: str, unit: str) -> dict:
    check_table(table)
    state = StateFile(table).load()
    u = _unit(state, table, unit)
    names = UnitNames(unit)
    live = counter_values(table)
    zero = {"packets": 0, "bytes": 0}
    counters = {d: {v: live.get(names.counter(d, v), zero) for v in ("pass", "drop")} for d in u.directions}
    if u.strict:  # what the hold dropped is the default's drop, as bpf counts it
        for d in u.directions:
            held = live.get(names.held_counter(d), zero)
            counters[d]["drop"] = {k: counters[d]["drop"][k] + held[k] for k in ("packets", "bytes")}
    return {
        "unit": unit, "table": table, "path": f"inet {table}", "mode": u.mode,
        "ingress": u.ingress, "egress": u.egress,
        "chains": {d: names.chain(d) for d in u.directions},
        "counters": counters, "params": dict(sorted(u.params.items())),
        "sets": {n: list(s.elements) for n, s in sorted(u.sets.items())},
        "attached": _attached(u),
        "events": {"log_rate": u.log_rate, "log_burst": u.log_burst, "log_group": state.log_group,
                   # both directions, as the interface says (0 for one the unit does not filter)
                   "lost": {d: live.get(names.counter(d, "lost"), zero)["packets"] if d in u.directions else 0
                            for d in DIRECTIONS}},
    }


def summary(table: str) -> list[dict]:
    check_table(table)
    state = StateFile(table).load()
    out = []
    for unit, u in sorted(state.units.items()):
        names = UnitNames(unit)
        out.append({"unit": unit, "mode": u.mode, "ingress": u.ingress, "egress": u.egress,
                    "chains": {d: names.chain(d) for d in u.directions}, "attached": _attached(u)})
    return out


def explain(checked, direction: str, unit: str = "UNIT.service", params: dict | None = None,
            sets: dict | None = None, mode: str = "enforce", log: "lower.Log | None" = None) -> str:
    """The chains `checked` becomes for `direction`, as nft text (nothing is loaded)."""
    return lower.explain(checked.expr, direction, UnitNames(unit), mode, params or {}, sets or {}, log)


def destroy(table: str) -> None:
    """Delete our table and its state file (tests, uninstall)."""
    check_table(table)
    sf = StateFile(table)
    with sf.locked():
        if _live_chains(table) is not None:
            runner().json([layout.delete_table(table)], f"deleting table inet {table}")
        sf.remove()

