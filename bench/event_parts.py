#!/usr/bin/env python3
"""The floor of a drop event's cost: each part alone (bench/event_parts.c, one program per
part), through BPF_PROG_TEST_RUN, in the same rounds as the empty program and the map lookup
every part starts with; the ring is drained before every run, so every reserve succeeds.

Compare with bench/per_packet.py's "drop/on-written − drop/off": what port_filter.c's event
path costs is about coarse_clock + cgroup_id + cmpxchg + reserve_fill_submit over lookup.
Writes bench/out/event_parts.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import PACKETS, load_empty  # noqa: E402

from bpfwall.backends.bpf import ETH_P  # noqa: E402
from bpfwall.kernel import loader, progs  # noqa: E402
from bpfwall.kernel.elf import read_object  # noqa: E402
from bpfwall.kernel.ringbuf import RingBuffer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PARTS = ["lookup", "coarse_clock", "jiffies", "clock", "cgroup_id", "spin_lock", "cmpxchg", "reserve_submit",
         "reserve_fill_submit", "output", "submit_wakeup"]
RUN = 500  # test runs per measurement: fewer than the ring's ~900 records


def compile_part(part: str, out: str):
    obj = os.path.join(out, f"{part}.o")
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-Wall", f"-I/usr/include/{platform.machine()}-linux-gnu",
                    f"-DPART_{part}", "-c", os.path.join(HERE, "event_parts.c"), "-o", obj], check=True)
    return read_object(obj)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=40, help="measurements of RUN test runs per round (median)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        objs = {p: compile_part(p, tmp) for p in PARTS}
    loaded = {p: loader.load(o) for p, o in objs.items()}
    rings = {p: RingBuffer(l.maps["ep_ring"]) for p, l in loaded.items()}
    empty = load_empty()
    data = b"\0" * 12 + struct.pack("!H", ETH_P[4]) + PACKETS["ipv4/tcp:22"]
    ns = {p: [] for p in ["empty", *PARTS]}
    try:
        for _ in range(args.rounds):
            ns["empty"].append(statistics.median(progs.prog_test_run(empty, data, RUN)[1] for _ in range(args.runs)))
            for p, l in loaded.items():
                runs = []
                for _ in range(args.runs):
                    rings[p].drain()
                    runs.append(progs.prog_test_run(l.progs["cgroup_skb/ingress"], data, RUN)[1])
                ns[p].append(statistics.median(runs))
    finally:
        for r in rings.values():
            r.close()
        for l in loaded.values():
            l.close()
        os.close(empty)
    med = {p: statistics.median(v) for p, v in ns.items()}
    print(f"each part alone, ns per test run (median of {args.rounds} rounds × {args.runs} × {RUN} runs; "
          f"ring drained before each run)")
    print(f"{'part':<20} {'ns':>7} {'− empty':>8} {'− lookup':>9}")
    for p, v in med.items():
        print(f"{p:<20} {v:>7.1f} {v - med['empty']:>8.1f} {v - med['lookup']:>9.1f}")
    print("submit_wakeup: every record wakes the reader (BPF_RB_FORCE_WAKEUP), an IPI each")
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    with open(os.path.join(HERE, "out", "event_parts.json"), "w") as f:
        json.dump({"ns": med, "run": RUN, "rounds": args.rounds}, f, indent=2)


if __name__ == "__main__":
    main()
