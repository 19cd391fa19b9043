#!/usr/bin/env python3
"""clang vs bcc (bpfwall/compilers.py), same filter, same run.

Cold compile: the filter built into an empty cache by each compiler, in alternating rounds;
wall time and the CPU time of the compiler's process (the machine may be shared: CPU time is
the figure to compare). Per packet: both objects loaded, run through BPF_PROG_TEST_RUN beside
an empty program in the same rounds (repeat ≥ 1,000,000, median over rounds). Writes
bench/out/compilers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import FILTER, PACKETS, load_empty  # noqa: E402

from bpfwall.backends.bpf import ETH_P  # noqa: E402
from bpfwall.build import UnitProgram, build  # noqa: E402
from bpfwall.kernel import loader, progs  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

COMPILERS = ("clang", "bcc")


def cold(program: UnitProgram) -> tuple[float, float, object]:
    """(wall s, the compiler processes' CPU s, the object) of one build into an empty cache."""
    with tempfile.TemporaryDirectory() as cache:
        os.chmod(cache, 0o700)
        cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        obj = build(program, Path(cache))
        t1, cpu1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    return t1 - t0, (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), obj


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compiles", type=int, default=3, help="cold compiles per compiler")
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    checked = analyze(FILTER)
    programs = {c: UnitProgram(checked, checked, compiler=c) for c in COMPILERS}

    times = {c: {"wall": [], "cpu": []} for c in COMPILERS}
    objs = {}
    for _ in range(args.compiles):
        for c in COMPILERS:
            wall, cpu, objs[c] = cold(programs[c])
            times[c]["wall"].append(wall)
            times[c]["cpu"].append(cpu)
    compile_med = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    print(f"filter: {FILTER}\ncold compile, median of {args.compiles} (load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")
    print(f"{'compiler':<8} {'wall s':>7} {'CPU s':>7} {'insns in/eg':>12}")
    for c in COMPILERS:
        n = "/".join(str(len(p.insns) // 8) for p in objs[c].programs.values())
        print(f"{c:<8} {compile_med[c]['wall']:>7.2f} {compile_med[c]['cpu']:>7.2f} {n:>12}")
    print(f"bcc / clang: {compile_med['bcc']['cpu'] / compile_med['clang']['cpu']:.1f}× CPU, "
          f"{compile_med['bcc']['wall'] / compile_med['clang']['wall']:.1f}× wall")

    loaded = {c: loader.load(objs[c]) for c in COMPILERS}
    empty = load_empty()
    rows = []
    try:
        for name, pkt in PACKETS.items():
            data = b"\0" * 12 + struct.pack("!H", ETH_P[pkt[0] >> 4]) + pkt
            ns = {k: [] for k in ("empty", *COMPILERS)}
            verdicts = set()
            for _ in range(args.rounds):
                ns["empty"].append(progs.prog_test_run(empty, data, args.repeat)[1])
                for c in COMPILERS:
                    retval, t = progs.prog_test_run(loaded[c].progs["cgroup_skb/ingress"], data, args.repeat)
                    ns[c].append(t)
                    verdicts.add(retval)
            assert len(verdicts) == 1, f"{name}: the two programs disagree"
            med = {k: statistics.median(v) for k, v in ns.items()}
            rows.append({"packet": name, "verdict": "pass" if verdicts.pop() else "drop", **{f"{k}_ns": v for k, v in med.items()},
                         "bcc_minus_clang_ns": med["bcc"] - med["clang"]})
    finally:
        os.close(empty)
        for lo in loaded.values():
            lo.close()
    print(f"\nper packet (repeat {args.repeat}, median of {args.rounds} rounds, same run):")
    print(f"{'packet':<14} {'verdict':<7} {'empty':>6} {'clang':>6} {'bcc':>6} {'bcc−clang':>10}")
    for r in rows:
        print(f"{r['packet']:<14} {r['verdict']:<7} {r['empty_ns']:>6.1f} {r['clang_ns']:>6.1f} {r['bcc_ns']:>6.1f} "
              f"{r['bcc_minus_clang_ns']:>+10.1f}")
    deltas = [r["bcc_minus_clang_ns"] for r in rows]
    print(f"bcc − clang: median {statistics.median(deltas):+.1f} ns, largest {max(deltas, key=abs):+.1f} ns "
          "(goal: within 1 ns)")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compilers.json"), "w") as f:
        json.dump({"filter": FILTER, "compile": compile_med, "compile_samples": times, "repeat": args.repeat,
                   "rounds": args.rounds, "rows": rows, "loadavg": os.getloadavg()[0]}, f, indent=2)


if __name__ == "__main__":
    main()
