"""Rates from two successive reads of a unit's counters (`stats --watch`, `tune`).

Counters only grow while a unit stays loaded; one that went down was reset (the unit was
unloaded and loaded again), so what it counts now all happened since the previous read.
"""
from __future__ import annotations

VERDICTS = ("pass", "drop")
FIELDS = ("packets", "bytes")


def deltas(before: dict, after: dict) -> dict:
    """{direction: {verdict: {packets, bytes}}}: what was counted between two `counters` reads
    (the directions `after` has)."""
    out = {}
    for direction, verdicts in after.items():
        old = before.get(direction, {})
        out[direction] = {}
        for verdict in VERDICTS:
            now, then = verdicts[verdict], old.get(verdict, {})
            out[direction][verdict] = {f: now[f] - then.get(f, 0) if now[f] >= then.get(f, 0) else now[f]
                                       for f in FIELDS}
    return out


def per_second(counted: dict, seconds: float) -> dict:
    """The same shape as `counted`, divided by the seconds it took (0 if none passed)."""
    return {d: {v: {f: (n / seconds if seconds > 0 else 0.0) for f, n in fields.items()}
                for v, fields in verdicts.items()} for d, verdicts in counted.items()}


def human_bytes(rate: float) -> str:
    """8400 → '8.4 kB/s' (powers of 1000, as network rates are written)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(rate) < 1000 or unit == "GB":
            return f"{rate:.0f} {unit}/s" if unit == "B" else f"{rate:.1f} {unit}/s"
        rate /= 1000
    raise AssertionError("unreachable")
