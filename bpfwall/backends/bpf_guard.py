"""A slice default's `guard` map (port_filter.c, BPFWALL_SLICE_GUARD): for each descendant of
the slices the default sits on, the directions a deeper filter judges (its unit's own program,
a hand-off, a nested slice's default). The watcher keeps it; the program reads it per packet.

The map is pinned with the unit (`<unit dir>/guard`) and kept across reloads, so a watcher
that stops or is killed leaves every classification in place: what it classified stays
judged as it was, and a cgroup born meanwhile is one the map does not know (under a strict
slice: dropped until the watcher is back and classifies it).
"""
from __future__ import annotations

import os

from .. import program_contract as pc
from ..kernel import maps, pins


class GuardMap:
    """The pinned guard map of one slice default, open; writes only what changes."""

    def __init__(self, fd: int):
        self.map = maps.Map(fd)  # borrows fd: close() closes it
        self._fd = fd
        self.known: dict[int, frozenset[str]] = dict(self.entries())

    @classmethod
    def open(cls, d: pins.PinDir) -> "GuardMap | None":
        """The guard pinned in the unit's directory `d`, or None (the unit is no slice default)."""
        if not d.exists(pc.GUARD):
            return None
        return cls(d.get(pc.GUARD))

    def entries(self) -> dict[int, frozenset[str]]:
        """{cgroup id: directions judged below} as the kernel holds it now."""
        return dict(pc.decode_guard(k, v) for k, v in self.map.items())

    def classify(self, cgroup_id: int, below) -> bool:
        """Record the cgroup as classified, `below` the directions a deeper filter judges; whether
        that changed anything."""
        below = frozenset(below)
        if self.known.get(cgroup_id) == below:
            return False
        self.map.update(pc.guard_key(cgroup_id), pc.guard_value(below))
        self.known[cgroup_id] = below
        return True

    def forget(self, cgroup_id: int) -> bool:
        """Drop a removed cgroup's entry (ids are never reused: only room is at stake)."""
        self.known.pop(cgroup_id, None)
        return self.map.delete(pc.guard_key(cgroup_id))

    def keep_only(self, cgroup_ids) -> list[int]:
        """Drop every entry but those of `cgroup_ids` (after a full rescan); the ids dropped."""
        wanted = set(cgroup_ids)
        gone = [cgid for cgid in self.entries() if cgid not in wanted]
        for cgid in gone:
            self.forget(cgid)
        return gone

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
