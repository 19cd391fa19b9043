"""The bpf backend's drop events: each unit's `events` ring buffer, read as DropEvents.

Every unit has its own ring (program_contract.EVENTS_RING_BYTES), kept across reloads, so a
reader holds one RingBuffer per unit; the rings' epoll fds sit in one outer epoll, which is
the source's fileno(). With no units named, the pin root is looked at again every RESCAN
seconds for units loaded (or loaded anew) since.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import struct
import time

from .. import program_contract as pc
from .. import unitkey
from ..events import DropEvent, address
from ..kernel import maps, pins
from ..kernel.errors import KernelError
from ..kernel.fd import Fd
from ..kernel.ringbuf import RingBuffer
from ..program_contract import DIRECTIONS

RESCAN = 1.0  # seconds between looks for new units, when reading every unit


# pc.Event as a struct format: decoding is most of a reader's work at 100,000 events/s, and
# struct is several times faster than ctypes here (tests/unit/test_bpf_events.py checks the two agree).
RECORD = struct.Struct("=QQIHHHBBBBBB16s16s")
AUDIT = pc.MODES.index("audit")


@functools.lru_cache(maxsize=4096)
def _address(family: int, raw: bytes) -> str | None:
    return address(family, raw)  # a flood comes from few addresses


def decode(unit: str, raw: bytes, offset: float) -> DropEvent:
    """One record of the ring; `offset`: wall clock minus CLOCK_MONOTONIC, in seconds."""
    (time_ns, cgroup_id, length, proto, sport, dport, family, direction, verdict, is_icmp, icmp_type, icmp_code,
     saddr, daddr) = RECORD.unpack_from(raw)
    return DropEvent(
        time=time_ns / 1e9 + offset, unit=unit, direction=DIRECTIONS[direction],
        verdict="audit" if verdict == AUDIT else "drop", family=family,
        proto=None if proto == pc.NO_PROTO else proto, saddr=_address(family, saddr),
        daddr=_address(family, daddr), sport=sport, dport=dport,
        icmp_type=icmp_type if is_icmp else None, icmp_code=icmp_code if is_icmp else None,
        length=length, cgroup_id=cgroup_id)


class _UnitRing:
    """One unit's ring and loss counters, held open (they outlive an unload while held)."""

    def __init__(self, unit: str, d: pins.PinDir):
        self.unit = unit
        self.ring_fd = d.get(pc.EVENTS)
        self.lost_map = None
        try:
            self.map_id = maps.map_info(self.ring_fd).id
            self.ring = RingBuffer(self.ring_fd)
            self.lost_map = maps.Map(Fd(d.get(pc.EVENTS_LOST)))
        except BaseException:
            self.close()
            raise

    def lost(self) -> dict[str, int]:
        return {d: pc.sum_lost(self.lost_map.lookup_percpu(pc.number_key(i)) or [])
                for i, d in enumerate(DIRECTIONS)}

    def close(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        if self.lost_map is not None:
            self.lost_map.close()
            self.lost_map = None
        if self.ring_fd >= 0:
            os.close(self.ring_fd)
            self.ring_fd = -1


class BpfEvents:
    """Backend.events() of the bpf backend (base.EventSource)."""

    def __init__(self, pin_root: str, units: list[str] | None = None):
        from .bpf import BackendError, units as loaded_units

        self.pin_root = pin_root
        self.wanted = units
        self._units = loaded_units
        self._epoll = select.epoll()
        self._rings: dict[str, _UnitRing] = {}
        self._next_scan = 0.0
        try:
            self._scan()
            for unit in units or ():
                if unit not in self._rings:
                    raise BackendError(f"unit {unit} has no drop events: it is not loaded, or was loaded by "
                                       f"a bpfwall without events (load it again); pin root {pin_root}")
        except BaseException:
            self.close()
            raise

    def _scan(self) -> None:
        """Open the rings of the units wanted that are not open (or were unloaded and loaded anew)."""
        self._next_scan = time.monotonic() + RESCAN
        try:
            root = pins.PinDir.open(self.pin_root)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        with root:
            for unit in self.wanted if self.wanted is not None else self._units(self.pin_root):
                key = unitkey.encode(unit)
                if not root.exists(key):
                    continue
                with root.sub(key) as d:
                    if not d.exists(pc.EVENTS) or not d.exists(pc.EVENTS_LOST):
                        continue
                    old = self._rings.get(unit)
                    if old is not None:
                        fd = d.get(pc.EVENTS)
                        try:
                            if maps.map_info(fd).id == old.map_id:
                                continue
                        finally:
                            os.close(fd)
                        self._drop(unit)
                    ring = _UnitRing(unit, d)
                    self._rings[unit] = ring
                    self._epoll.register(ring.ring.fileno(), select.EPOLLIN)

    def _drop(self, unit: str) -> None:
        ring = self._rings.pop(unit)
        with contextlib.suppress(OSError):
            self._epoll.unregister(ring.ring.fileno())
        ring.close()

    def fileno(self) -> int:
        return self._epoll.fileno()

    def _drain(self) -> list[DropEvent]:
        offset = time.time() - time.monotonic()
        return [decode(unit, raw, offset) for unit, ring in self._rings.items() for raw in ring.ring.drain()]

    def read(self, timeout: float | None = None) -> list[DropEvent]:
        out = self._drain()
        if out:
            return out
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_scan:
                self._scan()
            wait = self._next_scan - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            self._epoll.poll(max(wait, 0))
            out = self._drain()
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def lost(self) -> dict[tuple[str, str], int]:
        return {(unit, d): n for unit, ring in self._rings.items() for d, n in ring.lost().items()}

    def close(self) -> None:
        for unit in list(self._rings):
            self._drop(unit)
        self._epoll.close()

    def __enter__(self) -> "BpfEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
