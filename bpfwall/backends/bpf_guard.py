"""A slice default's guard maps (port_filter.c, BPFWALL_SLICE_GUARD): for each descendant of
the slices the default sits on, the directions a deeper filter judges (its unit's own program,
a hand-off, a nested slice's default). The watcher keeps them; the program reads them per packet.

A class lives in the array `guard`, in the slot the cgroup id's low bits choose (the slot holds
the id, so the program sees whose it is), or in the hash `guard_more` when another id holds
that slot. Both are pinned with the unit and kept across reloads, so a watcher that stops or is
killed leaves every classification in place: what it classified stays judged as it was, and a
cgroup born meanwhile is one they do not know (under a strict slice: dropped until the watcher
is back and classifies it).

A slot is rewritten with one map update (a 16-byte copy the program may read half-done): a slot
is freed before another id takes it, so a torn read pairs an id with no class or a class with
id 0 — an unclassified cgroup for a moment (fail closed), never another cgroup's class.
"""
from __future__ import annotations

import os

from .. import program_contract as pc
from ..kernel import maps, pins


class GuardMap:
    """The pinned guard maps of one slice default, open; writes only what changes."""

    def __init__(self, slots_fd: int, more_fd: int):
        self.slots, self.more = maps.Map(slots_fd), maps.Map(more_fd)  # borrowed: close() closes them
        self._fds = [slots_fd, more_fd]
        self.holder: dict[int, int] = {}  # slot index → the cgroup id in it
        self.known: dict[int, frozenset[str]] = {}
        for index, raw in self.slots.items():
            cgid, below = pc.decode_guard_slot(raw)
            if cgid:
                self.holder[pc.Index.from_buffer_copy(index).value] = cgid
                self.known[cgid] = below
        for key, raw in self.more.items():
            cgid, below = pc.decode_guard(key, raw)
            self.known[cgid] = below

    @classmethod
    def open(cls, d: pins.PinDir) -> "GuardMap | None":
        """The guard pinned in the unit's directory `d`, or None (the unit is no slice default)."""
        if not d.exists(pc.GUARD) or not d.exists(pc.GUARD_MORE):
            return None
        slots = d.get(pc.GUARD)
        try:
            return cls(slots, d.get(pc.GUARD_MORE))
        except BaseException:
            os.close(slots)
            raise

    def entries(self) -> dict[int, frozenset[str]]:
        """{cgroup id: directions judged below} as the kernel holds them now."""
        out = {}
        for _, raw in self.slots.items():
            cgid, below = pc.decode_guard_slot(raw)
            if cgid:
                out[cgid] = below
        out.update(pc.decode_guard(k, v) for k, v in self.more.items())
        return out

    def _index(self, cgroup_id: int) -> int:
        return cgroup_id & (pc.GUARD_SLOTS - 1)

    def classify(self, cgroup_id: int, below) -> bool:
        """Record the cgroup as classified, `below` the directions a deeper filter judges; whether
        that changed anything."""
        below = frozenset(below)
        if self.known.get(cgroup_id) == below:
            return False
        i = self._index(cgroup_id)
        if self.holder.get(i, cgroup_id) == cgroup_id:
            self.slots.update(pc.guard_index(cgroup_id), pc.guard_slot(cgroup_id, below))
            self.holder[i] = cgroup_id
        else:
            self.more.update(pc.guard_key(cgroup_id), pc.guard_value(below))
        self.known[cgroup_id] = below
        return True

    def forget(self, cgroup_id: int) -> bool:
        """Drop a removed cgroup's class (ids are never reused: only room is at stake)."""
        if self.known.pop(cgroup_id, None) is None:
            return False
        i = self._index(cgroup_id)
        if self.holder.get(i) == cgroup_id:
            self.slots.update(pc.guard_index(cgroup_id), pc.FREE_SLOT)
            del self.holder[i]
            return True
        return self.more.delete(pc.guard_key(cgroup_id))

    def keep_only(self, cgroup_ids) -> list[int]:
        """Drop every class but those of `cgroup_ids` (after a full rescan); the ids dropped."""
        wanted = set(cgroup_ids)
        gone = [cgid for cgid in self.entries() if cgid not in wanted]
        for cgid in gone:
            self.known.setdefault(cgid, frozenset())
            self.forget(cgid)
        return gone

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
