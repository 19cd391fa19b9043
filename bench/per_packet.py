#!/usr/bin/env python3
"""Per-packet cost of a bpfwall program vs an empty cgroup_skb program, in the same run.

Both run through BPF_PROG_TEST_RUN (repeat ≥ 1,000,000, the kernel reports the
mean ns per run); rounds alternate the two programs so drift hits both, and the
median over rounds is reported. Writes bench/out/per_packet.json.

Then drop events (issue 10): a passing and a dropped packet through the same object loaded
twice, events off (log_rate 0) and on, in the same rounds as the empty program. "on, limited"
is a flood's usual case (the rate limit says no: the loss is counted); "on, written" writes
every record: the limit never bites (log_rate = log_burst = 1,000,000, set afresh before each
round), the ring is drained before each run and a run (500 packets) fits in it; each run's
records are counted, and the bench says whether every measured drop wrote its event.
bench/event_parts.py measures the parts of the event path alone (its floor).
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
from packets import FILTER, PACKETS, load_empty  # noqa: E402

from bpfwall import program_contract as pc  # noqa: E402
from bpfwall.backends.bpf import ETH_P, PinnedUnit  # noqa: E402
from bpfwall.kernel.ringbuf import RingBuffer  # noqa: E402
from bpfwall.build import UnitProgram, build  # noqa: E402
from bpfwall.kernel import loader, progs  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

# r0 = 1; exit


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
    empty = load_empty()
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
    summary["events"] = events_bench(obj, repeat=args.repeat, rounds=args.rounds)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "per_packet.json"), "w") as f:
        json.dump({"filter": FILTER, "repeat": args.repeat, "rounds": args.rounds, "rows": rows,
                   **summary}, f, indent=2)


def _set_limit(loaded, rate: int, burst: int) -> None:
    unit = PinnedUnit("(bench)", "", {}, dict(loaded.maps), {})
    unit.write_log_limit({"log_rate": rate, "log_burst": burst})


def _lost(loaded) -> int:
    unit = PinnedUnit("(bench)", "", {}, dict(loaded.maps), {})
    return sum(unit.events_lost().values())


def events_bench(obj, repeat: int, rounds: int) -> dict:
    """Pass and drop, events off and on, beside the empty program, same rounds."""
    empty = load_empty()
    off, on = loader.load(obj), loader.load(obj)
    ring = RingBuffer(on.maps[pc.EVENTS])
    written_repeat = 500  # < the ring's ~900 records: every run writes all of its events
    written = []  # per "written" run: every drop wrote its record, none was lost
    try:
        _set_limit(off, 0, 0)
        packets = {"pass": PACKETS["ipv4/tcp:80"], "drop": PACKETS["ipv4/tcp:22"]}
        ns = {k: [] for k in ("empty", "pass/off", "pass/on", "drop/off", "drop/on-limited", "drop/on-written")}
        for _ in range(rounds):
            for verdict, pkt in packets.items():
                data = b"\0" * 12 + struct.pack("!H", ETH_P[pkt[0] >> 4]) + pkt
                if verdict == "pass":
                    ns["empty"].append(progs.prog_test_run(empty, data, repeat)[1])
                ns[f"{verdict}/off"].append(progs.prog_test_run(off.progs["cgroup_skb/ingress"], data, repeat)[1])
                fd = on.progs["cgroup_skb/ingress"]
                if verdict == "pass":
                    _set_limit(on, pc.LOG_LIMIT_MAX, pc.LOG_LIMIT_MAX)
                    ns["pass/on"].append(progs.prog_test_run(fd, data, repeat)[1])
                    continue
                _set_limit(on, 1, 1)  # one event, then the bucket is empty: the limited path
                ns["drop/on-limited"].append(progs.prog_test_run(fd, data, repeat)[1])
                ring.drain()
                _set_limit(on, pc.LOG_LIMIT_MAX, pc.LOG_LIMIT_MAX)
                runs = []
                for _ in range(max(1, repeat // written_repeat // 20)):
                    lost = _lost(on)
                    runs.append(progs.prog_test_run(fd, data, written_repeat)[1])
                    written.append(len(ring.drain()) == written_repeat and _lost(on) == lost)
                ns["drop/on-written"].append(statistics.median(runs))
    finally:
        ring.close()
        os.close(empty)
        off.close()
        on.close()
    med = {k: statistics.median(v) for k, v in ns.items()}
    out = {"ns": med, "every_written_drop_wrote_its_event": all(written),
           "pass_on_minus_off_ns": med["pass/on"] - med["pass/off"],
           "drop_on_limited_over_off": med["drop/on-limited"] / med["drop/off"],
           "drop_on_written_over_off": med["drop/on-written"] / med["drop/off"],
           "ratios_to_empty": {k: v / med["empty"] for k, v in med.items()}}
    print(f"\ndrop events (ipv4/tcp:80 passes, ipv4/tcp:22 is dropped; median of {rounds} rounds, same run):")
    print(f"{'case':<18} {'ns':>7} {'× empty':>8}")
    for k, v in med.items():
        print(f"{k:<18} {v:>7.1f} {v / med['empty']:>8.2f}")
    print(f"on-written: {len(written)} runs of {written_repeat}; every drop wrote its event, none lost: "
          f"{'yes' if all(written) else 'NO'}")
    print(f"pass: events on − off = {out['pass_on_minus_off_ns']:+.1f} ns (goal: within 1 ns)")
    print(f"drop: events on / off = {out['drop_on_limited_over_off']:.2f} limited, "
          f"{out['drop_on_written_over_off']:.2f} written (goal: ≤ 2)")
    return out


if __name__ == "__main__":
    main()
