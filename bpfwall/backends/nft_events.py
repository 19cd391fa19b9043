"""The nft backend's drop events: what its units' `log group` rules hand to nfnetlink_log,
as DropEvents (bpfwall/events.py).

A unit's drop path (lower/nft.py drop_rules) logs to the table's nflog group with a prefix
naming the unit, direction and verdict (nft/names.py UnitNames.log_prefix); the prefixes are
mapped back through the table's state (read again when an unknown one arrives: a unit
loaded after the source opened). What the rate limit held back is in each unit's named
`lost` counters; messages lost between the kernel and this reader (a full socket buffer, or a
fan-out that could not keep up) are counted from their sequence numbers (nflog.Sequence),
not by unit: reported under ("", "").

A group has one listener, so readers share it as fanout.py says: the first binds it and sends
the datagrams it receives to the others (channel nflog-<network namespace>-<group>).
"""
from __future__ import annotations

import os
import struct
import time

from ..events import DropEvent
from ..lang.errors import LangError
from ..lang.packet import parse_packet
from ..nft.names import UnitNames
from ..nft.nflog import NflogReader, Sequence
from ..fanout import Hub
from ..nft.state import StateFile
from .nft import counter_values

VERDICTS = ("drop", "audit")
UNATTRIBUTED = ("", "")  # lost() key of events the socket buffer dropped (no unit known)


def l3_length(payload: bytes) -> int:
    """The packet's length from its IP header (the payload is only its first bytes)."""
    if len(payload) >= 4 and payload[0] >> 4 == 4:
        return struct.unpack_from("!H", payload, 2)[0]
    if len(payload) >= 6 and payload[0] >> 4 == 6:
        return 40 + struct.unpack_from("!H", payload, 4)[0]
    return len(payload)


def drop_event(unit: str, direction: str, verdict: str, when: float, payload: bytes) -> DropEvent:
    """A logged packet as a DropEvent (family 0 and no fields when it is not IP)."""
    try:
        p = parse_packet(payload)
    except LangError:
        return DropEvent(when, unit, direction, verdict, 0, None, None, None, 0, 0, None, None, len(payload))
    ports = p.proto in (6, 17) and p.l4
    icmp = p.icmp and p.l4
    return DropEvent(when, unit, direction, verdict, p.family, p.proto, str(p.saddr), str(p.daddr),
                     p.src_port if ports else 0, p.dst_port if ports else 0,
                     p.icmp_type if icmp else None, p.icmp_code if icmp else None, l3_length(payload))


class NftEvents:
    """Drop events of table `table`'s units (`units`; None: all, also those loaded later)."""

    def __init__(self, table: str, units: list[str] | None = None, state_dir: str | None = None):
        self.table = table
        self.units = set(units) if units else None
        state = StateFile(table).load()
        self._prefixes: dict[str, tuple[str, str, str]] = {}
        self._learn(state)
        self.sequence = Sequence()
        self.group = state.log_group
        self._hub = Hub(state_dir)
        try:
            netns = os.stat("/proc/self/ns/net").st_ino  # groups are per network namespace
            self.channel = self._hub.join(f"nflog-{netns}-{state.log_group}", lambda: NflogReader(state.log_group),
                                          lambda record: "")
            self._base = self._lost_counters()  # lost() counts from now on
        except BaseException:
            self._hub.close()
            raise

    def _learn(self, state) -> None:
        self._prefixes = {UnitNames(unit).log_prefix(d, v): (unit, d, v)
                          for unit, u in state.units.items() for d in u.directions for v in VERDICTS}

    def _lost_counters(self) -> dict[tuple[str, str], int]:
        state = StateFile(self.table).load()
        live = counter_values(self.table)
        out = {}
        for unit, u in state.units.items():
            if self.units is None or unit in self.units:
                for d in u.directions:
                    out[(unit, d)] = live.get(UnitNames(unit).counter(d, "lost"), {}).get("packets", 0)
        return out

    def fileno(self) -> int:
        return self._hub.fileno()

    def timeout(self) -> float | None:
        return self._hub.timeout()

    def read(self, timeout: float | None = None) -> list[DropEvent]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            packets = [p for _, datagrams in self._hub.poll(left) for d in datagrams for p in self.sequence.parse(d)]
            if any(p.prefix not in self._prefixes for p in packets):
                self._learn(StateFile(self.table).load())
            out = []
            for p in packets:
                who = self._prefixes.get(p.prefix)
                if who is None or (self.units is not None and who[0] not in self.units):
                    continue
                out.append(drop_event(*who, p.time, p.payload))
            if out or (deadline is not None and time.monotonic() >= deadline):
                return out

    def lost(self) -> dict[tuple[str, str], int]:
        """Events the rate limit held back since the source opened, by (unit, direction); those
        the socket buffer dropped under UNATTRIBUTED."""
        out = {}
        for k, n in self._lost_counters().items():
            base = self._base.get(k, 0)
            out[k] = n - base if n >= base else n  # a re-created counter (log_rate 0, then on) restarts at 0
        if self.sequence.lost:  # also what a fan-out owner dropped for us: a gap like any other
            out[UNATTRIBUTED] = self.sequence.lost
        return out

    def close(self) -> None:
        self._hub.close()

    def __enter__(self) -> "NftEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
