"""Which policy entry judges the packets of a cgroup: the nearest one up the tree.

An entry sits on cgroups in one of two ways (match.py says which entry sits on a cgroup):

- a **unit entry** (its name does not end in `.slice`: `nginx.service`, `*`, `app-*.scope`)
  sits on the cgroup of each unit it names; its program covers the unit's sub-cgroups;
- a **slice default** (its name ends in `.slice`: `system.slice`, `*.slice`, `user-*.slice`,
  optionally narrowed by `cgroup =`) sits on each slice it names and is the default of every
  cgroup below the slice that no nearer entry sits on.

The rule, per direction: walk from the cgroup up to the root; the first cgroup on the way
that holds an entry filtering that direction (the cgroup itself, the unit it lies in, or the
nearest slice with a default) gives the one entry that judges its packets. Nothing on the
way: unpoliced. Entries farther up never add their verdict (no AND of ancestors, unlike plain
cgroup_skb programs, which the kernel runs from the socket's cgroup up to the root and all
must pass). An entry that leaves a direction out does not police it: that direction falls
to the nearest default that does (`egress = "true"` is how a unit allows everything out of
a default-deny slice).

`judge(policy, cgroup)` answers for one cgroup with everything a back-end or a display needs:

    j = judge(policy, "system.slice/nginx.service/worker")
    j.holders          every cgroup on the path that holds an entry (any direction), root first
    j.defaults         the slice defaults among them, root first
    j.judge("egress")  the Holder that judges egress: .level, .cgroup (relative path), .entry
    j.entry("egress")  its Entry, or None
    j.how("egress")    "own" (an entry on the cgroup itself, or on the unit it lies in),
                       "default" (the nearest slice default), or "none"
    j.reason("egress") one line saying why
    j.shadowed("egress")  the holders filtering egress above the judge: they do not judge it

Levels count path components below the root the paths are relative to: `system.slice` is
level 1, `system.slice/nginx.service` level 2 (the kernel's cgroup level when the root is the
cgroup2 mount; add the root's own level otherwise). The watcher fills a slice guard's map
from `holders`: a descendant of slice S is judged by something nearer than S's default in a
direction exactly when `j.judge(direction).level > S.level`.
"""
from __future__ import annotations

from dataclasses import dataclass

from .entry import Entry
from .match import Policy

OWN, DEFAULT, NONE = "own", "default", "none"
DIRECTIONS = ("ingress", "egress")


@dataclass(frozen=True)
class Holder:
    """A cgroup on a path that holds an entry."""
    level: int
    cgroup: str       # relative to the root, "" for the root itself
    entry: Entry

    @property
    def is_slice_default(self) -> bool:
        return self.entry.is_slice_default

    def filters(self, direction: str) -> bool:
        return getattr(self.entry, _checked_direction(direction)) is not None


def _checked_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: ingress or egress")
    return direction


@dataclass(frozen=True)
class Judgement:
    cgroup: str
    holders: tuple[Holder, ...]   # root first

    @property
    def level(self) -> int:
        """The level of the cgroup asked about."""
        return len(_parts(self.cgroup))

    @property
    def defaults(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders if h.is_slice_default)

    def judge(self, direction: str) -> Holder | None:
        for h in reversed(self.holders):
            if h.filters(direction):
                return h
        return None

    def entry(self, direction: str) -> Entry | None:
        j = self.judge(direction)
        return None if j is None else j.entry

    def how(self, direction: str) -> str:
        j = self.judge(direction)
        return NONE if j is None else DEFAULT if j.is_slice_default else OWN

    def shadowed(self, direction: str) -> tuple[Holder, ...]:
        j = self.judge(direction)
        return () if j is None else tuple(h for h in self.holders if h.level < j.level and h.filters(direction))

    def reason(self, direction: str) -> str:
        j = self.judge(direction)
        skipped = [h for h in self.holders if not h.filters(direction) and (j is None or h.level > j.level)]
        note = "".join(f"; {h.entry.name} ({h.entry.where}) on {_parts(h.cgroup)[-1]} leaves {direction} out"
                       for h in reversed(skipped))
        if j is None:
            if not skipped:
                return "unpoliced: no entry sits on it or on any cgroup above it"
            return (f"unpoliced: no entry on the way filters {direction} ("
                    + ", ".join(f"{h.entry.name} ({h.entry.where})" for h in reversed(skipped)) + " leave it out)")
        where = f"{j.entry.name} ({j.entry.where})"
        if j.is_slice_default:
            if j.cgroup == self.cgroup:
                return f"the slice's own default {where}, level {j.level}" + note
            return (f"no entry of its own; the default of {_parts(j.cgroup)[-1]} (level {j.level}), the nearest "
                    f"slice with one: {where}" + note)
        if j.cgroup == self.cgroup:
            return f"its own entry {where}"
        return f"inside {_parts(j.cgroup)[-1]} (level {j.level}), whose entry covers its sub-cgroups: {where}" + note

    def as_dict(self) -> dict:
        def holder(h: Holder | None) -> dict | None:
            return None if h is None else {
                "level": h.level, "cgroup": h.cgroup, "entry": h.entry.name, "file": h.entry.file,
                "line": h.entry.line, "slice_default": h.is_slice_default,
                "directions": [d for d in DIRECTIONS if h.filters(d)]}

        return {"cgroup": self.cgroup, "level": self.level, "holders": [holder(h) for h in self.holders],
                **{d: {"how": self.how(d), "reason": self.reason(d), "judge": holder(self.judge(d))}
                   for d in DIRECTIONS}}


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def judge(policy: Policy, cgroup_rel: str) -> Judgement:
    """Which entry judges the packets of sockets in this cgroup (path relative to the root), per
    direction, and every entry on its path; pure (reads no file, asks no kernel)."""
    parts = _parts(cgroup_rel)
    holders = []
    for level in range(1, len(parts) + 1):
        prefix = "/".join(parts[:level])
        entry = policy.match(prefix)
        if entry is not None:
            holders.append(Holder(level, prefix, entry))
    return Judgement("/".join(parts), tuple(holders))
