#!/usr/bin/env python3
"""Per-packet cost of a bpfwall program vs an empty cgroup_skb program, in the same run.

Both run through BPF_PROG_TEST_RUN (repeat ≥ 1,000,000, the kernel reports the
mean ns per run); rounds alternate the two programs so drift hits both, and the
median over rounds is reported. Writes bench/out/per_packet.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import PACKETS  # noqa: E402

from bpfwall.backends.bpf import ETH_P  # noqa: E402
from bpfwall.build import UnitProgram, build  # noqa: E402
from bpfwall.kernel import loader, progs, syscall  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

FILTER = "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)"
# r0 = 1; exit
EMPTY = struct.pack("<BBhi", 0xB7, 0, 0, 1) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    checked = analyze(FILTER)
    with tempfile.TemporaryDirectory() as cache:
        os.chmod(cache, 0o700)
        obj = build(UnitProgram(checked, checked), cache=__import__("pathlib").Path(cache))
    loaded = loader.load(obj)
    empty = progs.prog_load(syscall.BPF_PROG_TYPE_CGROUP_SKB, EMPTY, "GPL",
                            syscall.BPF_CGROUP_INET_INGRESS, "empty")
    prog = loaded.progs["cgroup_skb/ingress"]
    rows = []
    try:
        for name, pkt in PACKETS.items():
            data = b"\0" * 12 + struct.pack("!H", ETH_P[pkt[0] >> 4]) + pkt
            base, ours = [], []
            for _ in range(args.rounds):
                base.append(progs.prog_test_run(empty, data, args.repeat)[1])
                retval, ns = progs.prog_test_run(prog, data, args.repeat)
                ours.append(ns)
            b, o = statistics.median(base), statistics.median(ours)
            rows.append({"packet": name, "verdict": "pass" if retval else "drop", "empty_ns": b,
                         "bpfwall_ns": o, "delta_ns": o - b, "ratio": o / b if b else None})
    finally:
        os.close(empty)
        loaded.close()

    print(f"filter: {FILTER}  (counters on; repeat {args.repeat}, median of {args.rounds} rounds)")
    print(f"{'packet':<14} {'verdict':<7} {'empty ns':>9} {'bpfwall ns':>11} {'delta ns':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['packet']:<14} {r['verdict']:<7} {r['empty_ns']:>9.1f} {r['bpfwall_ns']:>11.1f} "
              f"{r['delta_ns']:>9.1f} {r['ratio']:>6.2f}")
    deltas = [r["delta_ns"] for r in rows]
    summary = {"median_delta_ns": statistics.median(deltas), "max_delta_ns": max(deltas)}
    print(f"median delta over packets: {summary['median_delta_ns']:.1f} ns, max {summary['max_delta_ns']:.1f} ns")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "per_packet.json"), "w") as f:
        json.dump({"filter": FILTER, "repeat": args.repeat, "rounds": args.rounds, "rows": rows,
                   **summary}, f, indent=2)


if __name__ == "__main__":
    main()
