"""Notice when someone removes bpfwall's table (`nft flush ruleset`, `nft delete table`)
and restore it, with every attachment, from the state file. One guard for `bpfwall nft-guard`
(its own loop, run()) and the watcher (whose poll loop drives it: fd, readable, tick).

Event-driven: a NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES hears
every ruleset change in the network namespace (ours too). The guard reads the events: the
watcher's own attaches and detaches add and remove map elements all the time, and a health
check after each of them would slow a burst of new cgroups, so only a removal of a table,
chain, rule, set or object (or lost events) asks for a check, a few ms after the burst settles.
When the burst removed rules from our chains (`nft flush table`, `flush chain`, `delete rule`:
the events name the chain) the check also counts those chains' rules, since an emptied chain
lets everything through; the first check counts them all. Once a second the guard checks in any
case (events can be lost: a full socket buffer reports ENOBUFS, handled as a removal).
"""
from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass

from .dump import (NETLINK_NETFILTER, NFNL_SUBSYS_NFTABLES, NFT_MSG_DELRULE, NFTA_RULE_CHAIN, NFTA_RULE_TABLE,
                   messages, nft_attrs, string)
from .errors import NftError

NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1


def ruleset_events() -> socket.socket:
    """A netlink socket that becomes readable whenever the nftables ruleset changes."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    s.bind((0, 0))
    s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    s.setblocking(False)
    return s


# nf_tables_msg_types that only add things or touch set elements: never a removal of our table's
# rules or chains (element deletions are every detach's own doing).
HARMLESS = {0,   # NEWTABLE
            3,   # NEWCHAIN
            6,   # NEWRULE
            9,   # NEWSET
            12,  # NEWSETELEM
            14,  # DELSETELEM
            15,  # NEWGEN (ends every transaction)
            18,  # NEWOBJ
            22}  # NEWFLOWTABLE


class Removals:
    """What a burst of ruleset events removed, as the health check needs it: `any` (something
    other than additions and element changes), `chains` (chains of `table` that lost rules:
    their rules must be counted), `everything` (events lost or unreadable: count all)."""

    def __init__(self, table: str):
        self.table = table
        self.clear()

    def clear(self) -> None:
        self.any, self.everything, self.chains = False, False, set()

    def lost(self) -> None:
        self.any = self.everything = True

    def read(self, buf: bytes) -> None:
        try:
            for kind, start, end in messages(buf):
                if kind >> 8 != NFNL_SUBSYS_NFTABLES:
                    self.any = True
                elif kind & 0xff == NFT_MSG_DELRULE:
                    attrs = nft_attrs(buf, start, end)
                    if string(attrs.get(NFTA_RULE_TABLE)) == self.table:
                        self.any = True
                        self.chains.add(string(attrs.get(NFTA_RULE_CHAIN)) or "")
                elif kind & 0xff not in HARMLESS:
                    self.any = True
        except ValueError:
            self.lost()  # malformed: look at the table rather than trust it

    def depth(self):
        """The check's `deep` argument: False, True (count every chain) or the chains to count."""
        return True if self.everything else (self.chains or False)


def drain(s: socket.socket, removals: Removals) -> bool:
    """Read every pending event into `removals`; whether there was any."""
    seen = False
    while True:
        try:
            buf = s.recv(65536)
        except BlockingIOError:
            return seen
        except OSError:  # ENOBUFS: events were lost; assume the worst
            seen = True
            removals.lost()
            continue
        if not buf:
            return seen
        seen = True
        removals.read(buf)


@dataclass(frozen=True)
class Restored:
    """One restore: the table, what its state file put back, how long it took."""
    table: str
    units: int
    attachments: int
    took_ms: float

    def message(self) -> str:
        return (f"table inet {self.table} was flushed, emptied or deleted: restored {self.units} unit(s) and "
                f"{self.attachments} attachment(s) in {self.took_ms:.0f} ms")


class Guard:
    """Keeps table `table` in place.

    Driven by a poll loop: poll `fd`, call `readable()` when it is ready and `tick()` after every
    wake-up, wait at most `timeout_ms()`; run() is such a loop, start() runs it in a thread.
    `check(table, deep)` is the restore function (default: the nft backend's restore_if_needed);
    `on_restore(Restored)` is called after each restore, `on_error(message)` once per distinct
    failure of the check (the next event or poll retries it)."""

    def __init__(self, table: str, poll: float = 1.0, settle: float = 0.005, check=None, on_restore=None,
                 on_error=None):
        if check is None:
            from ..backends.nft import restore_if_needed as check
        self.table = table
        self.poll, self.settle = poll, settle
        self.restore_if_needed, self.on_restore, self.on_error = check, on_restore, on_error
        self.sock = ruleset_events()  # subscribed before the first check: no change slips between
        self.due: float | None = time.monotonic()  # check at once
        self.removals = Removals(table)
        self.removals.lost()  # the first check counts every chain's rules
        self.last = 0.0
        self.restores = 0
        self.errors: list[str] = []  # distinct failures in a row, as on_error heard them
        self._failing: str | None = None  # the last check's error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- driven by a poll loop ------------------------------------------------------------

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
            restored = self.restore_if_needed(self.table, deep)
        except NftError as e:  # e.g. a cgroup vanished mid-restore: the next event or poll retries
            if str(e) != self._failing:  # once per distinct failure, not once a second
                self.errors.append(str(e))
                if self.on_error is not None:
                    self.on_error(str(e))
            self._failing = str(e)
            return
        self._failing = None
        if not restored:
            return
        took = (time.monotonic() - start) * 1000
        self.restores += 1
        if self.on_restore is not None:
            from .state import StateFile

            units = StateFile(self.table).load().units
            attached = sum(len(u.attached) for u in units.values())
            self.on_restore(Restored(self.table, len(units), attached, took))

    def close(self) -> None:
        """Stop the thread start() made, if any, and unsubscribe."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- its own loop ---------------------------------------------------------------------

    def run(self) -> None:
        """The poll loop, until close() (from another thread) or KeyboardInterrupt."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if poller.poll(min(self.timeout_ms(), 200)):  # wake up for close() at least 5 times a second
                self.readable()
            self.tick()

    def start(self) -> "Guard":
        """run() in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name=f"bpfwall-nft-guard-{self.table}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "Guard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
