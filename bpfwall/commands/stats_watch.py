"""`bpfwall stats UNIT --watch [SECONDS]`: a unit's packet and byte rates, one line per
direction every SECONDS, from successive counter reads, until Ctrl-C or a closed pipe (both
exit 0)."""
from __future__ import annotations

import json
import os
import sys
import time

from ..rates import deltas, human_bytes, per_second


def watch(backend, unit: str, seconds: float, as_json: bool) -> None:
    try:
        _loop(backend, unit, seconds, as_json)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # Nobody reads any more: stop, and keep Python's flush at exit from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _loop(backend, unit: str, seconds: float, as_json: bool) -> None:
    s = backend.stats(unit)
    before, then = s["counters"], time.monotonic()
    # The first line is the baseline: what counts from here on shows in the lines after it.
    if as_json:
        _line(json.dumps({"unit": unit, "time": time.time(), "counters": before}))
    else:
        _line(f"{unit} [{s['mode']}]: rates every {seconds:g} s (Ctrl-C stops)")
    while True:
        time.sleep(max(0.0, then + seconds - time.monotonic()))
        s = backend.stats(unit)  # an Error (the unit was unloaded) ends the watch with its message
        now, after = time.monotonic(), s["counters"]
        counted = {d: c for d, c in deltas(before, after).items() if s.get(d) is not None}
        rates = per_second(counted, now - then)
        if as_json:
            _line(json.dumps({"unit": unit, "time": time.time(), "seconds": round(now - then, 6),
                              "counters": after, "delta": counted, "rates": rates}))
        else:
            stamp = time.strftime("%H:%M:%S")
            drop = "would drop" if s["mode"] == "audit" else "drop"
            for d, r in rates.items():
                _line(f"{stamp} {d:<7} pass {r['pass']['packets']:.1f} pkt/s {human_bytes(r['pass']['bytes'])}, "
                      f"{drop} {r['drop']['packets']:.1f} pkt/s {human_bytes(r['drop']['bytes'])}")
        before, then = after, now


def _line(text: str) -> None:
    print(text, flush=True)
