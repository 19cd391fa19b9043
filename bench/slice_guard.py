#!/usr/bin/env python3
"""Per-packet cost of a slice default's guard (port_filter.c, BPFWALL_SLICE_GUARD), in the same
BPF_PROG_TEST_RUN rounds as the unit's own program alone and an empty cgroup_skb program.

A packet of a unit with its own filter, in a slice with a default, runs two programs: the unit's
and the slice's guard, which finds the unit's cgroup in its map (one helper call, one inlined
array lookup) and passes it untouched. BPF_PROG_TEST_RUN gives its dummy socket the cgroup of the
calling process, so this process sits in `<bench>.slice/unit.service` while it measures: the
guard looks up the very cgroup id it would on real traffic. Cases:

  unit alone            the unit's program (the filter of bench/per_packet.py)
  guard: judged below   the unit's cgroup is in the guard's map as judged below: pass untouched
  … by the helper       the same, in a guard built to read the cgroup id with
                        bpf_skb_cgroup_id() (what a kernel without BTF gets; kernel/vmlinux.py)
  guard: its default    classified, judged by the slice's default (the same filter)
  guard: unclassified   not in the map: the ancestor walk (a cgroup the watcher has not seen yet)

The goal: unit + guard ≤ 1.15 × the unit alone, i.e. (unit + guard − empty) / unit, taking out
the harness's per-run cost once (two programs on one packet pay the kernel's run-array loop
once, not twice). Writes bench/out/slice_guard.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import FILTER, PACKETS, load_empty  # noqa: E402

from bpfwall import build as bpfwall_build, program_contract as pc  # noqa: E402
from bpfwall.backends.bpf import ETH_P  # noqa: E402
from bpfwall.build import UnitProgram, build  # noqa: E402
from bpfwall.kernel import cgroup, loader, maps, progs  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402
from bpfwall.sandbox import TempCgroup  # noqa: E402

PACKET = "ipv4/udp:53"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    checked = analyze(FILTER)
    with tempfile.TemporaryDirectory() as cache:
        os.chmod(cache, 0o700)
        unit_obj = build(UnitProgram(checked, checked), cache=Path(cache))
        guard_obj = build(UnitProgram(checked, checked, slice_default=True), cache=Path(cache))
        with_helper, bpfwall_build._socket_cgroup_id_flags = bpfwall_build._socket_cgroup_id_flags, list
        try:
            helper_obj = build(UnitProgram(checked, checked, slice_default=True), cache=Path(cache))
        finally:
            bpfwall_build._socket_cgroup_id_flags = with_helper
    unit, guard, helper = loader.load(unit_obj), loader.load(guard_obj), loader.load(helper_obj)
    empty = load_empty()
    pkt = PACKETS[PACKET]
    data = b"\0" * 12 + struct.pack("!H", ETH_P[pkt[0] >> 4]) + pkt
    guard_slots = guard.maps[pc.GUARD]
    ns = {k: [] for k in ("empty", "unit alone", "guard: judged below", "… by the helper", "guard: its default",
                          "guard: unclassified")}
    try:
        with TempCgroup("bpfwall-bench", suffix=".slice") as sl, \
                TempCgroup(name="unit.service", parent=sl.path) as unit_cg, unit_cg.entered():
            cgid = cgroup.cgroup_id(unit_cg.path)
            index = pc.guard_index(cgid)
            for _ in range(args.rounds):
                ns["empty"].append(progs.prog_test_run(empty, data, args.repeat)[1])
                ns["unit alone"].append(progs.prog_test_run(unit.progs["cgroup_skb/egress"], data, args.repeat)[1])
                maps.map_update(helper.maps[pc.GUARD], index, pc.guard_slot(cgid, pc.DIRECTIONS))
                ns["… by the helper"].append(progs.prog_test_run(helper.progs["cgroup_skb/egress"], data, args.repeat)[1])
                for case, value in (("guard: judged below", pc.guard_slot(cgid, pc.DIRECTIONS)),
                                    ("guard: its default", pc.guard_slot(cgid, [])),
                                    ("guard: unclassified", pc.FREE_SLOT)):
                    maps.map_update(guard_slots, index, value)
                    retval, t = progs.prog_test_run(guard.progs["cgroup_skb/egress"], data, args.repeat)
                    ns[case].append(t)
                    assert retval == 1  # the filter passes DNS: below untouched, else judged and passed
                # the guard sees this cgroup: judged below, a packet the default drops passes untouched
                maps.map_update(guard_slots, index, pc.guard_slot(cgid, pc.DIRECTIONS))
                drop = PACKETS["ipv4/tcp:22"]
                drop = b"\0" * 12 + struct.pack("!H", ETH_P[drop[0] >> 4]) + drop
                assert progs.prog_test_run(guard.progs["cgroup_skb/egress"], drop, 1)[0] == 1
                maps.map_update(guard_slots, index, pc.guard_slot(cgid, []))
                assert progs.prog_test_run(guard.progs["cgroup_skb/egress"], drop, 1)[0] == 0
            level = len(os.path.relpath(unit_cg.path, cgroup.cgroup2_mount()).split("/"))
    finally:
        os.close(empty)
        unit.close()
        guard.close()
        helper.close()
    med = {k: statistics.median(v) for k, v in ns.items()}
    e, u, g = med["empty"], med["unit alone"], med["guard: judged below"]
    result = {"filter": FILTER, "packet": PACKET, "repeat": args.repeat, "rounds": args.rounds,
              "unit_cgroup_level": level, "ns": med,
              "guard_over_unit": g / u, "unit_plus_guard_over_unit": (u + g - e) / u,
              "unit_plus_helper_guard_over_unit": (u + med["… by the helper"] - e) / u}
    print(f"slice guard per packet ({PACKET}, filter {FILTER}; repeat {args.repeat}, median of {args.rounds} "
          f"rounds; this process in a cgroup at level {level})")
    print(f"{'case':<22} {'ns':>7} {'× empty':>8} {'× unit':>7}")
    for k, v in med.items():
        print(f"{k:<22} {v:>7.1f} {v / e:>8.2f} {v / u:>7.2f}")
    print(f"unit + guard (judged below) = {result['unit_plus_guard_over_unit']:.2f} × the unit alone "
          f"((unit + guard − empty) / unit; goal ≤ 1.15); guard / unit = {result['guard_over_unit']:.2f}; "
          f"with bpf_skb_cgroup_id() it would be {result['unit_plus_helper_guard_over_unit']:.2f}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "slice_guard.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
