"""Named step boundaries where tests kill bpfwall, deterministically.

Every place where a crash would leave a different state (between two kernel
changes that belong together) calls `reached("load:maps-pinned")`. Tests set

    BPFWALL_CRASH_AT=<step>[#N]   SIGKILL this process the N-th time (default 1st) it reaches <step>
    BPFWALL_CRASH_LOG=<file>      append every step reached, one per line (to list them all)

and then check that what the kernel runs is still what the pins say. Without
those variables this costs one dictionary lookup.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(step: str) -> None:
    log = os.environ.get("BPFWALL_CRASH_LOG")
    if log:
        with open(log, "a") as f:
            f.write(step + "\n")
    spec = os.environ.get("BPFWALL_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition("#")
    if name != step:
        return
    _counts[step] = _counts.get(step, 0) + 1
    if _counts[step] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
