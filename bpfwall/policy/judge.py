"""Which policy entry judges the packets of a cgroup: the nearest one up the tree.

An entry sits on cgroups in one of two ways (match.py says which entry sits on a cgroup):

- a **unit entry** (its name does not end in `.slice`: `nginx.service`, `*`, `app-*.scope`)
  sits on the cgroup of each unit it names; its program covers the unit's sub-cgroups;
- a **slice default** (its name ends in `.slice`: `system.slice`, `*.slice`, `user-*.slice`,
  optionally narrowed by `cgroup =`) sits on each slice it names and is the default of every
  cgroup below the slice that no nearer entry sits on.

The rule: walk from the cgroup up to the root; the first cgroup on the way that holds an
entry (the cgroup itself, the unit it lies in, or the nearest slice with a default) gives the
one entry that judges its packets. Nothing on the way: unpoliced. Entries farther up never
add their verdict (no AND of ancestors, unlike plain cgroup_skb programs, which the kernel
runs from the socket's cgroup up to the root and all must pass).

`judge(policy, cgroup)` answers for one cgroup with everything a back-end or a display needs:

    j = judge(policy, "system.slice/nginx.service/worker")
    j.entry            the judging Entry, or None
    j.how              "own" (an entry on the cgroup itself, or on the unit it lies in),
                       "default" (the nearest slice default), or "none"
    j.judge            the Holder that judges: .level, .cgroup (relative path), .entry
    j.holders          every cgroup on the path that holds an entry, root first (levels ascending)
    j.defaults         the slice defaults among them, root first
    j.shadowed         the holders above the judge, whose entries do not judge this cgroup
    j.reason           one line saying why

Levels count path components below the root the paths are relative to: `system.slice` is
level 1, `system.slice/nginx.service` level 2 (the kernel's cgroup level when the root is the
cgroup2 mount; add the root's own level otherwise). The watcher uses `holders` to fill a slice
guard's map: a descendant of slice S is policed by something nearer than S's default exactly
when a holder lies below S on its path (`j.judge.level > S.level`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .entry import Entry
from .match import Policy

OWN, DEFAULT, NONE = "own", "default", "none"


@dataclass(frozen=True)
class Holder:
    """A cgroup on a path that holds an entry."""
    level: int
    cgroup: str       # relative to the root, "" for the root itself
    entry: Entry

    @property
    def is_slice_default(self) -> bool:
        return self.entry.is_slice_default


@dataclass(frozen=True)
class Judgement:
    cgroup: str
    holders: tuple[Holder, ...]   # root first

    @property
    def judge(self) -> Holder | None:
        return self.holders[-1] if self.holders else None

    @property
    def entry(self) -> Entry | None:
        return self.holders[-1].entry if self.holders else None

    @property
    def level(self) -> int:
        """The level of the cgroup asked about."""
        return len(_parts(self.cgroup))

    @property
    def how(self) -> str:
        if not self.holders:
            return NONE
        return DEFAULT if self.holders[-1].is_slice_default else OWN

    @property
    def defaults(self) -> tuple[Holder, ...]:
        return tuple(h for h in self.holders if h.is_slice_default)

    @property
    def shadowed(self) -> tuple[Holder, ...]:
        return self.holders[:-1]

    @property
    def reason(self) -> str:
        j = self.judge
        if j is None:
            return "no entry sits on it or on any cgroup above it: unpoliced"
        where = f"{j.entry.name} ({j.entry.where})"
        if j.is_slice_default:
            slice_name = _parts(j.cgroup)[-1]
            if j.cgroup == self.cgroup:
                return f"the slice's own default {where}, level {j.level}"
            return (f"no entry of its own; the default of {slice_name} (level {j.level}), the nearest slice "
                    f"with one: {where}")
        if j.cgroup == self.cgroup:
            return f"its own entry {where}"
        return f"inside {_parts(j.cgroup)[-1]} (level {j.level}), whose entry covers its sub-cgroups: {where}"

    def as_dict(self) -> dict:
        def holder(h: Holder) -> dict:
            return {"level": h.level, "cgroup": h.cgroup, "entry": h.entry.name, "file": h.entry.file,
                    "line": h.entry.line, "slice_default": h.is_slice_default}

        return {"cgroup": self.cgroup, "level": self.level, "how": self.how, "reason": self.reason,
                "judge": None if self.judge is None else holder(self.judge),
                "holders": [holder(h) for h in self.holders]}


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def judge(policy: Policy, cgroup_rel: str) -> Judgement:
    """Which entry judges the packets of sockets in this cgroup (path relative to the root), and
    every entry on its path; pure (reads no file, asks no kernel)."""
    parts = _parts(cgroup_rel)
    holders = []
    for level in range(1, len(parts) + 1):
        prefix = "/".join(parts[:level])
        entry = policy.match(prefix)
        if entry is not None:
            holders.append(Holder(level, prefix, entry))
    return Judgement("/".join(parts), tuple(holders))
