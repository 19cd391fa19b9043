"""`bpfwall monitor [UNIT…] [--json]`: drop events as they happen, one line each (a firewall
log line, or one JSON object with --json), from the chosen backend (--backend).

It runs until interrupted: Ctrl-C (SIGINT) or SIGTERM, or a closed pipe (`monitor | head`)
end it with status 0; on Ctrl-C/SIGTERM it says on stderr how many events the units lost
(to their rate limit or a full buffer) while it ran.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from .options import backend


def register(add) -> None:
    p = add("monitor", "print drop events live, one line each (Ctrl-C ends it)", True)
    p.add_argument("units", nargs="*", metavar="UNIT", help="units to watch (default: every unit, also those "
                                                             "loaded while it runs)")
    p.add_argument("--count", type=int, metavar="N", default=None, help="stop after N events")
    p.set_defaults(handler=cmd_monitor)


def cmd_monitor(args) -> None:
    source = backend(args).events(args.units or None)
    out = sys.stdout
    shown = 0
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # ends it as Ctrl-C does
    try:
        lost_before = source.lost()
        try:
            while args.count is None or shown < args.count:
                events = source.read(None)
                if args.count is not None:
                    events = events[:args.count - shown]
                text = "".join((json.dumps(e.as_json()) if args.json else e.line()) + "\n" for e in events)
                shown += len(events)
                out.write(text)
                out.flush()
        except KeyboardInterrupt:
            lost = sum(n - lost_before.get(k, 0) for k, n in source.lost().items())
            print(f"bpfwall monitor: {shown} events shown, {lost} lost (rate limit or full buffer) meanwhile",
                  file=sys.stderr)
        except BrokenPipeError:
            # The reader is gone: nothing more can be written, and Python's flush at exit must
            # not complain about it either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
    finally:
        signal.signal(signal.SIGTERM, previous)
        source.close()
