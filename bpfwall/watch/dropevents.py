"""The watcher's drop events: read from each backend it uses, forwarded to the journal.

Each event becomes one record: MESSAGE= the firewall-log line (DropEvent.line()), the
structured fields of DropEvent.journal_fields() (UNIT=, BPFWALL_DIRECTION=, BPFWALL_VERDICT=,
SRC=, DST=, PROTO=, SPT=, DPT=…) and OBJECT_SYSTEMD_UNIT=: `journalctl -u nginx.service` shows a
record of a root process (_UID=0) whose OBJECT_SYSTEMD_UNIT= names the unit (UNIT= alone
matches only records of PID 1). Per unit at most `cap` records a second go to the journal;
the rest are counted and summed up in one "N drop events not logged" record when the second
is over (the kernel's own limit, log_rate/log_burst, comes first).
"""
from __future__ import annotations

import math
import time

from ..errors import Error
from .log import NOTICE

DEFAULT_CAP = 50  # records per unit and second


class EventForwarder:
    def __init__(self, log, cap: int = DEFAULT_CAP, state_dir: str | None = None):
        self.log = log
        self.cap = cap
        self.state_dir = state_dir  # where readers of the same source meet (fanout.py)
        self.sources: dict[str, object] = {}  # backend name → its EventSource
        self._second = int(time.monotonic())
        self._sent: dict[str, int] = {}       # unit → records sent this second
        self._held: dict[str, int] = {}       # unit → events not logged this second

    def follow(self, name: str, backend) -> None:
        """Read the drop events of every unit of `backend` (once per backend)."""
        if name in self.sources:
            return
        try:
            self.sources[name] = backend.events(None, state_dir=self.state_dir)
        except (Error, OSError, NotImplementedError) as e:
            self.log.warning("events", f"drop events of the {name} backend are not forwarded: {e}")
            self.sources[name] = None

    def fds(self) -> dict[int, object]:
        return {s.fileno(): s for s in self.sources.values() if s is not None}

    def readable(self, source) -> None:
        for event in source.read(0):
            self.forward(event)

    def forward(self, event) -> None:
        self.tick()
        sent = self._sent.get(event.unit, 0)
        if sent >= self.cap:
            self._held[event.unit] = self._held.get(event.unit, 0) + 1
            return
        self._sent[event.unit] = sent + 1
        self.log.record(event.line(), {**event.journal_fields(), "OBJECT_SYSTEMD_UNIT": event.unit,
                                       "BPFWALL_ACTION": "drop-event"}, NOTICE)

    def tick(self) -> None:
        """What is due after every wake-up: sources that read on a timer (a bpf ring drained while
        events come), and at a new second the summary of each unit's events held back in the last."""
        for source in self.sources.values():
            if source is not None and (wait := source.timeout()) is not None and wait <= 0:
                self.readable(source)
        now = int(time.monotonic())
        if now == self._second:
            return
        self._second = now
        for unit, n in sorted(self._held.items()):
            self.log.record(f"{unit}: {n} drop events not logged (more than {self.cap} a second)",
                            {"UNIT": unit, "OBJECT_SYSTEMD_UNIT": unit, "BPFWALL_ACTION": "drop-events-held",
                             "BPFWALL_NOT_LOGGED": str(n)}, NOTICE)
        self._sent.clear()
        self._held.clear()

    def timeout_ms(self) -> int | None:
        """Until a source wants reading on its timer, or the end of the second while a summary is due."""
        waits = [math.ceil(wait * 1000) for s in self.sources.values() if s is not None and (wait := s.timeout()) is not None]
        if self._held:
            waits.append(max(1, int((self._second + 1 - time.monotonic()) * 1000) + 1))
        return min(waits) if waits else None

    def close(self) -> None:
        for source in self.sources.values():
            if source is not None:
                source.close()
        self.sources.clear()
