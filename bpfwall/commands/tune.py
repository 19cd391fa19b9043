"""tune: the full-screen terminal UI (bpfwall/tune/) on every loaded unit, or on one."""
from __future__ import annotations

import sys

from ..errors import Error, UsageError
from .options import chosen_backends


def register(add) -> None:
    p = add("tune", "watch units live and change their params, sets and mode on one screen (a terminal UI)")
    p.add_argument("unit", nargs="?", help="open this loaded unit at once (default: the list of every unit)")
    p.set_defaults(handler=cmd_tune)


def find_unit(backends: dict, unit: str) -> tuple[str, str]:
    """(backend, unit) of the one backend that has `unit` loaded."""
    having = []
    for name, b in backends.items():
        try:
            rows = b.summary()
        except Error:
            if len(backends) == 1:
                raise
            continue  # a backend that cannot run here has no units
        if any(r["unit"] == unit for r in rows):
            having.append(name)
    if not having:
        raise UsageError(f"tune: unit {unit} is not loaded ({' or '.join(backends)} backend)")
    if len(having) > 1:
        raise UsageError(f"tune: {unit} is loaded by both backends: say which with --backend")
    return having[0], unit


def cmd_tune(args) -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("tune: needs a terminal (for a script, use `bpfwall stats` and `bpfwall set`)")
    from ..tune import app

    backends = chosen_backends(args)
    app.run(backends, find_unit(backends, args.unit) if args.unit else None)
