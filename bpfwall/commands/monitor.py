"""`bpfwall monitor [UNIT…] [--json]`: drop events as they happen, one line each (a firewall
log line, or one JSON object with --json), from both backends' units (or the one --backend or
$BPFWALL_BACKEND chooses).

It runs until interrupted: Ctrl-C (SIGINT) or SIGTERM, or a closed pipe (`monitor | head`)
end it with status 0; on Ctrl-C/SIGTERM it says on stderr how many events the units lost
(to their rate limit or a full buffer, or because monitor's own output could not keep up)
while it ran.

Other readers of the same units (another monitor, the watcher forwarding to the journal) see
every event too (fanout.py): while its output is blocked (`monitor | less`, paused) monitor
keeps reading (its output is written by a thread of its own), so a ring it owns is never held
up; up to BACKLOG bytes of lines wait, past that its own lines are dropped and counted.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import sys
import threading

from ..errors import Error, UsageError
from .options import chosen_backends

BACKLOG = 8 << 20  # bytes of lines waiting for a blocked output


def register(add) -> None:
    p = add("monitor", "print drop events live, one line each (Ctrl-C ends it)", True)
    p.add_argument("units", nargs="*", metavar="UNIT", help="units to watch (default: every unit, also those "
                                                             "loaded while it runs)")
    p.add_argument("--count", type=int, metavar="N", default=None, help="stop after N events")
    p.set_defaults(handler=cmd_monitor)


def open_source(args):
    """The drop events of the units asked for, from each backend that has some."""
    from ..backends.merged_events import MergedEvents

    backends = chosen_backends(args)
    units = args.units or None
    if len(backends) == 1:
        return next(iter(backends.values())).events(units)
    sources, found = [], set()
    try:
        for name, b in backends.items():
            try:
                have = {r["unit"] for r in b.summary()}
            except Error:
                continue  # a backend that cannot run here (nft without python3-nftables) has no units
            mine = have if units is None else have & set(units)
            if name == "bpf" or mine:  # bpf: also units loaded later (nft: its table must exist)
                sources.append(b.events(None if units is None else sorted(mine)))
                found |= mine
        missing = [u for u in units or () if u not in found]
        if missing:
            raise UsageError(f"monitor: {', '.join(missing)}: not loaded (bpf or nft backend)")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources[0] if len(sources) == 1 else MergedEvents(sources)


class Output(threading.Thread):
    """Writes the lines in a thread of its own, so that reading (and serving a ring's other
    readers) never waits for a blocked output. Up to BACKLOG bytes wait; past that, lines are
    refused (put() says so) and counted by the caller."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd = fd
        self.cond = threading.Condition()
        self.chunks: collections.deque[tuple[bytes, int]] = collections.deque()  # (text, events in it)
        self.size = self.written = 0  # bytes waiting; events written
        self.closing = False
        self.broken = False  # the reader of the output is gone (EPIPE)

    def put(self, data: bytes, events: int) -> bool:
        with self.cond:
            if self.size + len(data) > BACKLOG:
                return False
            self.chunks.append((data, events))
            self.size += len(data)
            self.cond.notify()
        return True

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.chunks and not self.closing:
                    self.cond.wait()
                if not self.chunks:
                    return
                batch = list(self.chunks)
                self.chunks.clear()
            data = memoryview(b"".join(text for text, _ in batch))
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except BrokenPipeError:
                self.broken = True
                return
            with self.cond:
                self.size -= sum(len(text) for text, _ in batch)
                self.written += sum(n for _, n in batch)

    def finish(self, timeout: float | None) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.join(timeout)


def cmd_monitor(args) -> None:
    source = open_source(args)
    out = Output(sys.stdout.fileno())
    out.start()
    taken = 0
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends it as Ctrl-C does
    try:
        lost_before = source.lost()
        try:
            while (args.count is None or taken < args.count) and not out.broken:
                events = source.read(1.0)  # at least once a second: a closed pipe ends it
                if args.count is not None:
                    events = events[:args.count - taken]
                if not events:
                    continue
                text = "".join((json.dumps(e.as_json()) if args.json else e.line()) + "\n" for e in events)
                taken += len(events)
                out.put(text.encode(), len(events))  # refused: lost, counted as taken − written
            out.finish(None)
        except KeyboardInterrupt:
            out.finish(1.0)  # what a blocked output has not taken by then is lost too
            lost = sum(n - lost_before.get(k, 0) for k, n in source.lost().items()) + taken - out.written
            print(f"bpfwall monitor: {out.written} events shown, {lost} lost (rate limit or full buffer) meanwhile",
                  file=sys.stderr)
        if out.broken:
            # The reader is gone: nothing more can be written, and Python's flush at exit must
            # not complain about it either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        signal.signal(signal.SIGTERM, previous)
        source.close()
