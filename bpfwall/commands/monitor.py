"""`bpfwall monitor [UNIT…] [--json]`: drop events as they happen, one line each (a firewall
log line, or one JSON object with --json), from both backends' units (or the one --backend or
$BPFWALL_BACKEND chooses).

It runs until interrupted: Ctrl-C (SIGINT) or SIGTERM, or a closed pipe (`monitor | head`)
end it with status 0; on Ctrl-C/SIGTERM it says on stderr how many events the units lost
(to their rate limit or a full buffer, or because monitor's own output could not keep up)
while it ran.

Other readers of the same units (another monitor, the watcher forwarding to the journal) see
every event too (fanout.py): while its output is blocked (`monitor | less`, paused) monitor
keeps reading, so a ring it owns is never held up; up to BACKLOG bytes of lines wait, past
that its own lines are dropped and counted.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys

from ..errors import Error, UsageError
from .options import chosen_backends

BACKLOG = 8 << 20  # bytes of lines waiting for a blocked output
CHUNK = select.PIPE_BUF  # a pipe that polls writable takes this much without blocking


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


def cmd_monitor(args) -> None:
    source = open_source(args)
    out = sys.stdout.fileno()
    shown = dropped = 0
    pending = bytearray()
    poller = select.poll()
    poller.register(source.fileno(), select.POLLIN)
    watching_out = False  # only while lines wait: a closed pipe polls as an error for ever
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends it as Ctrl-C does
    try:
        lost_before = source.lost()
        try:
            while args.count is None or shown < args.count or pending:
                if bool(pending) != watching_out:
                    watching_out = bool(pending)
                    poller.register(out, select.POLLOUT) if watching_out else poller.unregister(out)
                wait = source.timeout()
                ready = dict(poller.poll(None if wait is None else max(1, int(wait * 1000))))
                if args.count is None or shown < args.count:
                    events = source.read(0)
                    if args.count is not None:
                        events = events[:args.count - shown]
                    text = "".join((json.dumps(e.as_json()) if args.json else e.line()) + "\n" for e in events)
                    shown += len(events)
                    if len(pending) + len(text) > BACKLOG:
                        dropped += len(events)
                    else:
                        pending += text.encode()
                if pending and ready.get(out, 0) & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                    del pending[:os.write(out, pending[:CHUNK])]
        except KeyboardInterrupt:
            lost = sum(n - lost_before.get(k, 0) for k, n in source.lost().items()) + dropped
            print(f"bpfwall monitor: {shown - dropped} events shown, {lost} lost (rate limit or full buffer) meanwhile",
                  file=sys.stderr)
        except BrokenPipeError:
            # The reader is gone: nothing more can be written, and Python's flush at exit must
            # not complain about it either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out)
    finally:
        signal.signal(signal.SIGTERM, previous)
        source.close()
