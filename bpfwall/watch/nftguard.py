"""The nft guard inside the watcher's poll loop: restore our table after `nft flush ruleset`
or `nft delete table`, within a few milliseconds, without a thread.

Like bpfwall/nft/guard.py (the standalone `bpfwall nft-guard`), it listens to the
ruleset's netlink events and checks the table a few ms after a burst settles,
and once a second in any case (events can be lost). Unlike it, it reads the
events: the watcher's own attach and detach add and remove map elements all
the time, and a health check after each of them would slow a burst of new
cgroups, so only a removal of a table, chain, rule, set or object (or lost
events) asks for a check; rules removed from our chains (`nft flush table`
empties them and leaves them in place) get those chains' rules counted.
"""
from __future__ import annotations

import time

from ..backends import nft
from ..nft.errors import NftError
from ..nft.guard import Removals, drain, ruleset_events
from ..nft.state import StateFile

class TableGuard:
    """Owns the event socket; the daemon polls `fd`, calls `readable()` when it is ready and
    `tick()` after every wake-up, and waits at most `timeout_ms()`."""

    def __init__(self, table: str, log, poll: float = 1.0, settle: float = 0.005):
        self.table, self.log = table, log
        self.poll, self.settle = poll, settle
        self.sock = ruleset_events()  # subscribed before the first check: no change slips between
        self.due: float | None = time.monotonic()  # check at once
        self.removals = Removals(table)
        self.removals.lost()  # the first check counts every chain's rules
        self.last = 0.0
        self.restores = 0
        self._failing: str | None = None  # the last check's error, logged once

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def readable(self) -> None:
        drain(self.sock, self.removals)
        if self.removals.any and self.due is None:
            self.due = time.monotonic() + self.settle  # let the rest of a flush arrive first

    def timeout_ms(self) -> int:
        now = time.monotonic()
        until = self.last + self.poll if self.due is None else min(self.due, self.last + self.poll)
        return max(0, int((until - now) * 1000) + 1)

    def tick(self) -> None:
        now = time.monotonic()
        if (self.due is not None and now >= self.due) or now >= self.last + self.poll:
            self.check()

    def check(self) -> None:
        deep = self.removals.depth() if self.due is not None else False  # a poll only looks for chains
        self.removals.clear()
        self.due = None
        self.last = start = time.monotonic()
        try:
            restored = nft.restore_if_needed(self.table, deep=deep)
        except NftError as e:  # e.g. a cgroup vanished mid-restore: the next event or poll retries
            if str(e) != self._failing:  # once per distinct failure, not once a second
                self.log.error("restore", f"table inet {self.table}: {e}", table=self.table)
            self._failing = str(e)
            return
        self._failing = None
        if not restored:
            return
        self.restores += 1
        state = StateFile(self.table).load()
        units, attached = state.units, nft.attachments(state)
        took = (time.monotonic() - start) * 1000
        self.log.warning("restore", f"table inet {self.table} was flushed, emptied or deleted: restored {len(units)} "
                                    f"unit(s) and {attached} attachment(s) in {took:.0f} ms",
                         table=self.table, units=len(units), attachments=attached, took_ms=f"{took:.1f}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

