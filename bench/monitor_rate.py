#!/usr/bin/env python3
"""Does `bpfwall monitor` keep up with drop events? (issue 10: ≥ 100,000 events/s on this
2-core machine, or say how many it lost.)

A unit whose ingress filter drops UDP is loaded in a pin root of its own with a limit that
never bites (log_rate = log_burst = 1,000,000); `bpfwall monitor UNIT` runs as a subprocess
writing to a pipe this process counts lines from. Events come from BPF_PROG_TEST_RUN on the
pinned program, paced in slices of 1 ms to each target rate for --seconds; afterwards
the lines shown and the losses monitor reports on SIGTERM (the unit's lost counter: full ring;
and lines its output had not taken) must account for every event.
Writes bench/out/monitor_rate.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import PACKETS  # noqa: E402

from bpfwall.backends import bpf  # noqa: E402
from bpfwall.backends.bpf import ETH_P  # noqa: E402
from bpfwall.build import UnitProgram  # noqa: E402
from bpfwall.kernel import progs  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

UNIT = "bench-monitor.service"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LineCounter(threading.Thread):
    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.lines, self.last = pipe, 0, time.monotonic()

    def run(self) -> None:
        while chunk := os.read(self.pipe.fileno(), 1 << 20):
            self.lines += chunk.count(b"\n")
            self.last = time.monotonic()


def one_rate(pin_root: str, fd: int, data: bytes, rate: int | None, seconds: float) -> dict:
    """Generate events at `rate` per second (None: as fast as test runs go) against a fresh monitor."""
    env = {**os.environ, "BPFWALL_PIN_ROOT": pin_root}
    mon = subprocess.Popen([sys.executable, "-m", "bpfwall", "monitor", UNIT], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, cwd=REPO)
    counter = LineCounter(mon.stdout)
    counter.start()
    lost_before = bpf.stats(pin_root, UNIT)["events"]["lost"]["ingress"]
    time.sleep(1.0)  # the monitor is up and has opened the ring
    sent, start = 0, time.monotonic()
    per_slice = max(1, (rate or 0) // 1000)
    while (now := time.monotonic()) - start < seconds:
        if rate is None:
            progs.prog_test_run(fd, data, 1000)
            sent += 1000
            continue
        due = int((now - start) * rate)
        if sent < due:
            n = min(due - sent, per_slice * 10)
            progs.prog_test_run(fd, data, n)
            sent += n
        else:
            time.sleep(0.001)
    elapsed = time.monotonic() - start
    while time.monotonic() - counter.last < 0.5:  # the monitor drains what is left
        time.sleep(0.1)
    lost = bpf.stats(pin_root, UNIT)["events"]["lost"]["ingress"] - lost_before
    mon.terminate()
    err = mon.communicate()[1].decode()
    counter.join(5)
    # monitor's own count: lines its output did not take in time are lost too (none, if it keeps up)
    own = re.search(r"(\d+) events shown, (\d+) lost", err)
    lost = int(own.group(2)) if own else lost
    return {"target_per_s": rate, "generated": sent, "seconds": round(elapsed, 3),
            "generated_per_s": round(sent / elapsed), "shown": counter.lines, "lost": lost,
            "shown_per_s": round(counter.lines / elapsed), "accounted": counter.lines + lost == sent}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rates", default="50000,100000,200000,max")
    args = ap.parse_args()
    pin_root = f"/sys/fs/bpf/bpfwall-bench-{uuid.uuid4().hex[:8]}"
    bpf.load(pin_root, UNIT, UnitProgram(analyze("tcp"), None),
             log={"log_rate": 1_000_000, "log_burst": 1_000_000})
    pkt = PACKETS["ipv4/udp:53"]
    data = b"\0" * 12 + ETH_P[4].to_bytes(2, "big") + pkt
    rows = []
    try:
        with bpf.PinnedUnit.open(pin_root, UNIT) as u:
            for r in args.rates.split(","):
                rows.append(one_rate(pin_root, u.progs["ingress"], data, None if r == "max" else int(r), args.seconds))
    finally:
        bpf.unload(pin_root, UNIT)
        os.rmdir(pin_root)
    print(f"{'target/s':>9} {'generated':>10} {'gen/s':>8} {'shown':>9} {'shown/s':>8} {'lost':>8} {'lost %':>7} accounted")
    for r in rows:
        print(f"{r['target_per_s'] or 'max':>9} {r['generated']:>10} {r['generated_per_s']:>8} {r['shown']:>9} "
              f"{r['shown_per_s']:>8} {r['lost']:>8} {100 * r['lost'] / r['generated']:>6.2f}% {r['accounted']}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "monitor_rate.json"), "w") as f:
        json.dump({"seconds": args.seconds, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
