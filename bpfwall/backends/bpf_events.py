"""The bpf backend's drop events: each unit's `events` ring buffer, read as DropEvents.

Every unit has its own ring (program_contract.EVENTS_RING_BYTES), kept across reloads. A ring
has one consumer, so readers share it through bpfwall/fanout.py: the first reader of a ring
owns it (named by its map id) and the others subscribe; every reader sees every record. With
no units named, the pin root is looked at again every RESCAN seconds for units loaded (or
loaded anew) since.

The program wakes a ring's reader at most every program_contract.WAKE_EVERY_NS (a wakeup is
an IPI, microseconds), so after a record the owner drains its ring every LINGER_PERIOD for
LINGER seconds without being woken: longer than that interval plus a tick of the coarse clock
the program decides by (≤ 10 ms at HZ ≥ 100), so a record never waits unseen: one that did
not wake the reader came within the interval of one that did.
"""
from __future__ import annotations

import errno
import functools
import os
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
from ..fanout import Hub

RESCAN = 1.0  # seconds between looks for new units, when reading every unit
LINGER = 0.05  # > WAKE_EVERY_NS (10 ms) + one tick (≤ 10 ms)
LINGER_PERIOD = 0.002  # at 100,000 events/s, 200 of the ring's ~800 records


# pc.Event as a struct format: decoding is most of a reader's work at 100,000 events/s, and
# struct is several times faster than ctypes here (tests/unit/test_bpf_events.py checks the two agree).
RECORD = struct.Struct("=QQIHHHBBBBBB16s16s")
AUDIT = pc.MODES.index("audit")
U64 = (1 << 64) - 1


@functools.lru_cache(maxsize=4096)
def _address(family: int, raw: bytes) -> str | None:
    return address(family, raw)  # a flood comes from few addresses


def decode(unit: str, raw: bytes, offset: float, clock_offset_ns: int | None = 0) -> DropEvent:
    """One record of the ring; `offset`: wall clock minus CLOCK_MONOTONIC, in seconds;
    `clock_offset_ns`: CLOCK_MONOTONIC_COARSE minus the program's clock (log_limit's; None: not
    known, the time is now's)."""
    (time_ns, cgroup_id, length, proto, sport, dport, family, direction, verdict, is_icmp, icmp_type, icmp_code,
     saddr, daddr) = RECORD.unpack_from(raw)
    when = time.time() if clock_offset_ns is None else ((time_ns + clock_offset_ns) & U64) / 1e9 + offset
    return DropEvent(
        time=when, unit=unit, direction=DIRECTIONS[direction],
        verdict="audit" if verdict == AUDIT else "drop", family=family,
        proto=None if proto == pc.NO_PROTO else proto, saddr=_address(family, saddr),
        daddr=_address(family, daddr), sport=sport, dport=dport,
        icmp_type=icmp_type if is_icmp else None, icmp_code=icmp_code if is_icmp else None,
        length=length, cgroup_id=cgroup_id)


DIRECTION_AT = pc.Event.direction.offset


def direction_of(record: bytes) -> str:
    return DIRECTIONS[record[DIRECTION_AT]]


class _UnitRing:
    """One unit's ring (owned or subscribed to) and loss counters, held open (they outlive an
    unload while held)."""

    def __init__(self, unit: str, d: pins.PinDir, hub: Hub):
        self.unit = unit
        self.ring_fd = d.get(pc.EVENTS)
        self.lost_map = self.limit_map = self.channel = None
        self._clock: int | None = None
        try:
            self.map_id = maps.map_info(self.ring_fd).id
            self.lost_map = maps.Map(Fd(d.get(pc.EVENTS_LOST)))
            self.limit_map = maps.Map(Fd(d.get(pc.LOG_LIMIT)))
            self.channel = hub.join(f"ring-{self.map_id}", lambda: RingBuffer(self.ring_fd), direction_of,
                                    (LINGER, LINGER_PERIOD))
        except BaseException:
            self.close()
            raise

    def clock_offset_ns(self) -> int | None:
        """What turns the records' times into CLOCK_MONOTONIC_COARSE: the latest the program
        stored (at a wakeup, which comes before the first record after a pause). `set` of the
        limit zeroes it until the next wakeup: meanwhile the last one seen holds."""
        woken, offset = max(pc.clock_offset_ns(self.limit_map.lookup(pc.number_key(i))) for i in range(len(DIRECTIONS)))
        if woken:
            self._clock = offset
        return self._clock

    def lost(self) -> dict[str, int]:
        """The kernel's count (rate limit, full ring) and what an owner dropped for us."""
        return {d: pc.sum_lost(self.lost_map.lookup_percpu(pc.number_key(i)) or []) + self.channel.dropped[d]
                for i, d in enumerate(DIRECTIONS)}

    def close(self) -> None:
        for m in (self.lost_map, self.limit_map):
            if m is not None:
                m.close()
        self.lost_map = self.limit_map = None
        if self.ring_fd >= 0:
            os.close(self.ring_fd)
            self.ring_fd = -1


class BpfEvents:
    """Backend.events() of the bpf backend (base.EventSource)."""

    def __init__(self, pin_root: str, units: list[str] | None = None, state_dir: str | None = None):
        from .bpf import BackendError, units as loaded_units

        self.pin_root = pin_root
        self.wanted = units
        self._units = loaded_units
        self._rings: dict[str, _UnitRing] = {}
        self._next_scan = 0.0
        self._hub = Hub(state_dir)
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
                    if not all(d.exists(name) for name in (pc.EVENTS, pc.EVENTS_LOST, pc.LOG_LIMIT)):
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
                    self._rings[unit] = _UnitRing(unit, d, self._hub)

    def _drop(self, unit: str) -> None:
        ring = self._rings.pop(unit)
        self._hub.leave(ring.channel)
        ring.channel = None
        ring.close()

    def fileno(self) -> int:
        return self._hub.fileno()

    def timeout(self) -> float | None:
        """Seconds until read(0) has work without an fd becoming ready (a ring drained on a timer)."""
        return self._hub.timeout()

    def read(self, timeout: float | None = None) -> list[DropEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout
        rings = {ring.channel: ring for ring in self._rings.values()}
        while True:
            now = time.monotonic()
            if now >= self._next_scan:
                self._scan()
                rings = {ring.channel: ring for ring in self._rings.values()}
            wait = self._next_scan - now
            if deadline is not None:
                wait = min(wait, deadline - now)
            got = self._hub.poll(max(wait, 0))
            if got:
                offset = time.time() - time.monotonic()
                out = []
                for ch, records in got:
                    ring = rings[ch]
                    clock = ring.clock_offset_ns()
                    out += [decode(ring.unit, raw, offset, clock) for raw in records]
                return out
            if deadline is not None and time.monotonic() >= deadline:
                return []

    def lost(self) -> dict[tuple[str, str], int]:
        return {(unit, d): n for unit, ring in self._rings.items() for d, n in ring.lost().items()}

    def close(self) -> None:
        for unit in list(self._rings):
            self._drop(unit)
        self._hub.close()

    def __enter__(self) -> "BpfEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
