#!/usr/bin/env python3
"""What `ifname` costs: per packet, and the window after a device appears or is renamed.

1. Per packet (BPF_PROG_TEST_RUN on loopback, repeat ≥ 1,000,000, median over rounds that
   alternate the programs): an empty program, the port filter alone, and the same filter with
   `ifname in {"lo", "wg*"}` in front (one bpf_get_netns_cookie and one hash lookup per packet).
2. The window: units whose filters name interfaces are loaded into a pin root of the bench's
   own; a veth is renamed; the watcher's guard (backends/bpf_interfaces.py) wakes on the link
   message and rewrites every unit's ifaces map. Reported: from `ip link set … name` returning
   to every map holding the new name's bits, for 1, 10 and 50 units (the guard's work is one
   map update per unit).

Runs in a network namespace of its own. Writes bench/out/ifname.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import FILTER, PACKETS, load_empty  # noqa: E402

from bpfwall import program_contract as pc  # noqa: E402
from bpfwall.backends import bpf  # noqa: E402
from bpfwall.backends.bpf_interfaces import InterfaceGuard  # noqa: E402
from bpfwall.build import UnitProgram, build  # noqa: E402
from bpfwall.kernel import loader, netdev, progs  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

WITH_IFNAME = f'ifname in {{"lo", "wg*"}} && ({FILTER})'


class Quiet:
    def _say(self, *a, **k):
        pass
    debug = info = warning = error = _say


def enter_new_netns() -> str:
    name = f"bpfwall-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return name


def per_packet(cache, repeat: int, rounds: int) -> dict:
    objs = {name: build(UnitProgram(analyze(text), None), cache=cache)
            for name, text in (("filter", FILTER), ("filter+ifname", WITH_IFNAME))}
    loaded = {name: loader.load(obj) for name, obj in objs.items()}
    unit = bpf.PinnedUnit("(bench)", "", {"interfaces": ["lo", "wg*"]}, dict(loaded["filter+ifname"].maps), {})
    unit.write_interfaces()
    empty = load_empty()
    pkt = PACKETS["ipv4/udp:53"]
    data = b"\0" * 12 + struct.pack("!H", 0x0800) + pkt
    ns = {"empty": [], "filter": [], "filter+ifname": []}
    try:
        for _ in range(rounds):
            ns["empty"].append(progs.prog_test_run(empty, data, repeat)[1])
            for name, l in loaded.items():
                retval, t = progs.prog_test_run(l.progs["cgroup_skb/ingress"], data, repeat)
                assert retval == 1, name  # both pass the packet: same path through the filter
                ns[name].append(t)
    finally:
        os.close(empty)
        for l in loaded.values():
            l.close()
    med = {k: statistics.median(v) for k, v in ns.items()}
    print(f"per packet (ipv4/udp:53 on lo, passes; repeat {repeat}, median of {rounds} rounds, same run):")
    for k, v in med.items():
        print(f"  {k:<14} {v:6.1f} ns  {v / med['empty']:5.2f} × empty")
    print(f"  ifname adds {med['filter+ifname'] - med['filter']:+.1f} ns per packet")
    return {"ns": med, "ifname_adds_ns": med["filter+ifname"] - med["filter"]}


def window(pin_root: str, cache, counts: list[int], trials: int) -> dict:
    program = UnitProgram(None, analyze('ifname in {"lo", "good*"} || tcp'))
    build(program, cache=cache)
    out = {}
    loaded = 0
    subprocess.run(["ip", "link", "add", "bad0", "type", "veth", "peer", "name", "peer0"], check=True)
    guard = InterfaceGuard(pin_root, Quiet())
    try:
        for n in counts:
            while loaded < n:
                bpf.load(pin_root, f"u{loaded}.service", program, cache=cache)
                loaded += 1
            names, times = ["bad0", "good0"], []
            for i in range(trials):
                old, new = names[i % 2], names[(i + 1) % 2]
                index = {v: k for k, v in netdev.devices().items()}[old]
                want = bytes(pc.IfaceBits(pc.iface_bits(["good*", "lo"], new)))
                key = pc.iface_key(netdev.netns_cookie(), index)
                start = time.perf_counter()
                subprocess.run(["ip", "link", "set", old, "name", new], check=True)
                while select.select([guard.fd], [], [], 1.0)[0]:
                    guard.readable()
                    done = time.perf_counter()  # the check below is not part of the window
                    if _all_hold(pin_root, n, key, want):
                        break
                times.append((done - start) * 1000)
                assert _all_hold(pin_root, n, key, want)
            out[n] = {"median_ms": statistics.median(times), "max_ms": max(times)}
            print(f"  {n:>3} unit(s): rename → every map updated: median {out[n]['median_ms']:.1f} ms, "
                  f"max {out[n]['max_ms']:.1f} ms ({trials} renames; includes running ip(8))")
    finally:
        guard.close()
        for i in range(loaded):
            bpf.unload(pin_root, f"u{i}.service")
    return out


def _all_hold(pin_root: str, n: int, key: bytes, want: bytes) -> bool:
    for i in range(n):
        with bpf.PinnedUnit.open(pin_root, f"u{i}.service") as u:
            have = u.map(pc.IFACES).lookup(key)
        if (have or bytes(8)) != want:
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    netns = enter_new_netns()
    cache = tempfile.mkdtemp(prefix="bpfwall-bench-cache-")
    os.chmod(cache, 0o700)
    pin_root = f"/sys/fs/bpf/bpfwall-bench-{uuid.uuid4().hex[:8]}"
    try:
        from pathlib import Path
        result = {"per_packet": per_packet(Path(cache), args.repeat, args.rounds)}
        print("window after a rename (the watcher's guard):")
        result["window"] = window(pin_root, Path(cache), [1, 10, 50], args.trials)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if os.path.isdir(pin_root):
            os.rmdir(pin_root)
        subprocess.run(["ip", "netns", "del", netns], check=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ifname.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
