"""`policy check`'s warnings: entries whose meaning changed when slices got defaults, and
defaults that would cut off running units. Warnings, not errors: the policy is valid and
loads; each line says what happens now so the admin can decide before a reload.

    FILE:LINE: warning: units."NAME": what changed, and what it means here

Three kinds (pure: the cgroup tree, when there is one to look at, is given as tree.Cgroup):
- a glob of units that can match a slice's name (`*`, `*.s*`, `*e`) no longer sits on
  slices; the slices it policed under the old rule are named (they are no longer policed
  by it);
- every slice entry is now the default of the cgroups below it without an entry of their
  own, instead of an extra filter ANDed onto every cgroup below it;
- a default that drops everything in a direction (`false`, or any expression lang/constant.py
  proves false) on a slice holding running units without an entry of their own for that
  direction: they are named, since the default cuts them off (sshd!).
"""
from __future__ import annotations

from ..kernel.safefs import show
from ..lang.constant import never_passes
from .globs import globs_meet
from .judge import DIRECTIONS, judge
from .match import SLICE_SUFFIX, Policy, unit_component
from .schema import show_path

SLICE_NAMES = "?*" + SLICE_SUFFIX  # a slice's unit name: a stem, then .slice


def _head(entry) -> str:
    return f"{entry.where}: warning: {show_path(('units', entry.name))}"


def _names(items: list[str], most: int = 8) -> str:
    shown = ", ".join(show(i) for i in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def may_name_slices(entry) -> bool:
    """Can this entry of units (not a slice default) match a slice's name, by its globs?"""
    if entry.is_slice_default or not entry.is_glob:
        return False
    globs = [entry.name, SLICE_NAMES]
    last = entry.cgroup.rsplit("/", 1)[-1] if entry.cgroup else "**"
    if last != "**":
        globs.append(last)
    return globs_meet(*globs)


def drops_everything(entry, direction: str) -> bool:
    """Does the entry, enforced, drop every packet of this direction?"""
    if entry.mode != "enforce" or getattr(entry, direction) is None:
        return False
    return never_passes(getattr(entry.program(), direction).expr)


def warnings(policy: Policy, tree: list | None) -> list[str]:
    """Every warning, in policy order; `tree`: the cgroups that exist (tree.Cgroup), or None."""
    out = []
    slices = [c for c in tree or () if (unit_component(c.rel) or "").endswith(SLICE_SUFFIX)]
    for entry in policy.entries:
        if may_name_slices(entry):
            out.append(_glob_of_units(policy, entry, slices if tree is not None else None))
        elif entry.is_slice_default:
            out.append(f"{_head(entry)}: a slice default now: it judges the cgroups below "
                       f"{'each slice it names' if entry.is_glob else entry.name} that have no entry of their own "
                       f"(in each direction it filters), instead of being an extra filter ANDed onto every cgroup "
                       f"below it")
    if tree is not None:
        out += _cut_off(policy, tree)
    return out


def _glob_of_units(policy: Policy, entry, slices: list | None) -> str:
    text = (f"{_head(entry)}: names units only now, never a slice (only an entry whose name ends in "
            f"{SLICE_SUFFIX} is a slice default), though '{entry.name}' matches slice names")
    if slices is None:
        return text + "; no cgroup tree here to say which slices it policed"
    used = [c.rel for c in slices if policy.explain(c.rel, legacy=True).entry is entry]
    if not used:
        return text + "; it policed no slice that exists here"
    return text + f"; it used to police {_names(used)}, which it no longer polices"


def _cut_off(policy: Policy, tree: list) -> list[str]:
    """Defaults that drop every packet of a direction, on slices with running units that have
    no entry of their own for it."""
    hit: dict[tuple, dict[str, list[str]]] = {}  # (entry, slice cgroup) → direction → units
    for c in tree:
        unit = unit_component(c.rel)
        if not c.populated or unit is None or unit.endswith(SLICE_SUFFIX):
            continue
        j = judge(policy, c.rel)
        for d in DIRECTIONS:
            h = j.judge(d)
            if h is not None and h.is_slice_default and drops_everything(h.entry, d):
                hit.setdefault((h.entry, h.cgroup), {}).setdefault(d, []).append(unit)
    out = []
    for entry in policy.entries:
        for (e, where), by_direction in hit.items():
            if e is not entry:
                continue
            for d, units in by_direction.items():
                out.append(f"{_head(entry)}: the {d} default drops every packet, and {show(where)} holds "
                           f"{len(units)} running unit{'s' if len(units) != 1 else ''} without an entry of their own "
                           f"for {d}, which it cuts off: {_names(sorted(units))}")
    return out
