"""Notice when someone removes bpfwall's table (`nft flush ruleset`, `nft delete table`)
and restore it, with every attachment, from the state file.

Event-driven: a NETLINK_NETFILTER socket subscribed to NFNLGRP_NFTABLES hears
every ruleset change in the network namespace (ours too); after a burst of
events settles (a few ms) the guard checks that our table's chains are all
there and restores the table if not. When the burst removed rules from our
chains (`nft flush table`, `flush chain`, `delete rule`: the events name the
chain) the check also counts those chains' rules, since an emptied chain lets
everything through; the first check counts them all. A timeout on
the socket doubles as a slow poll, in case events were lost (a full socket
buffer reports ENOBUFS, which is handled as a removal).
"""
from __future__ import annotations

import select
import socket
import threading
import time

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


class Guard:
    """Keeps table `table` in place. `check(table, deep)` is the restore function (default:
    the nft backend's restore_if_needed); `on_restore(table)` is called after each restore."""

    def __init__(self, table: str, poll: float = 1.0, settle: float = 0.005, check=None, on_restore=None):
        if check is None:
            from ..backends.nft import restore_if_needed as check
        self.table = table
        self.poll, self.settle = poll, settle
        self.check, self.on_restore = check, on_restore
        self.restores = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> "Guard":
        self._sock = ruleset_events()  # subscribe before the first check: no change slips between
        self._thread = threading.Thread(target=self._run, name=f"bpfwall-nft-guard-{self.table}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Guard":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run_forever(self) -> None:
        """Run in the calling thread until stop() (or KeyboardInterrupt)."""
        if self._sock is None:
            self._sock = ruleset_events()
        self._run()

    def _run(self) -> None:
        self._check_once(deep=True)
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], min(self.poll, 0.2))
            if self._stop.is_set():
                return
            if ready:
                removals = Removals(self.table)
                drain(self._sock, removals)
                time.sleep(self.settle)  # let a burst (a whole flush, a transaction) finish
                drain(self._sock, removals)
                self._check_once(deep=removals.depth())
            elif time.monotonic() - self._last >= self.poll:
                self._check_once(deep=False)

    def _check_once(self, deep=True) -> None:
        self._last = time.monotonic()
        try:
            if self.check(self.table, deep):
                self.restores += 1
                if self.on_restore is not None:
                    self.on_restore(self.table)
        except NftError as e:  # e.g. a cgroup vanished mid-restore: the next event or poll retries
            self.errors.append(str(e))
