#!/usr/bin/env python3
"""How stats, list and a reload grow with the cgroup tree: 100 vs 10,000 cgroups present, a unit
attached to 100 of them. Before the attachment index they walked the whole cgroup2 tree (two
BPF_PROG_QUERY per cgroup); now they read the unit's pinned links and the slices systemd uses.

Each figure is the median of 5, in-process (the backend call) and as a user runs it (the CLI, with
`bpfwall --help` as the start-up baseline in the same run). Writes bench/out/scale.json.

    python bench/scale.py [--cgroups 100,10000] [--attached 100] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's bpfwall

from bpfwall.backends import bpf  # noqa: E402
from bpfwall.build import UnitProgram  # noqa: E402
from bpfwall.kernel import cgroup  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT = "scale.service"
FILTERS = ("udp && local_port == 5301", "udp && local_port == 5302")


def make_tree(root: str, count: int) -> list[str]:
    """`count` cgroups, 100 per directory (as units under slices would be)."""
    paths = []
    for i in range(count):
        parent = os.path.join(root, f"d{i // 100}")
        if i % 100 == 0:
            os.mkdir(parent)
        paths.append(os.path.join(parent, f"c{i}"))
        os.mkdir(paths[-1])
    return paths


def remove_tree(root: str) -> None:
    for dirpath, dirnames, _ in os.walk(root, topdown=False):
        for d in dirnames:
            os.rmdir(os.path.join(dirpath, d))
    os.rmdir(root)


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def cli(env, *args) -> None:
    subprocess.run([sys.executable, "-m", "bpfwall", *args], env=env, check=True, stdout=subprocess.DEVNULL)


def measure(count: int, attached: int, rounds: int, cache) -> dict:
    pin_root = f"/sys/fs/bpf/bpfwall-bench-{uuid.uuid4().hex[:8]}"
    root = os.path.join(cgroup.cgroup2_mount(), f"bpfwall-bench-{uuid.uuid4().hex[:8]}")
    os.mkdir(root)
    env = dict(os.environ, BPFWALL_PIN_ROOT=pin_root, BPFWALL_CACHE_DIR=str(cache), PYTHONPATH=REPO)
    programs = [UnitProgram(analyze(f), None) for f in FILTERS]
    try:
        paths = make_tree(root, count)
        bpf.load(pin_root, UNIT, programs[0], cache=cache)
        bpf.load(pin_root, UNIT, programs[1], cache=cache)  # both objects cached: reloads build nothing
        step = max(1, count // attached)
        for path in paths[::step][:attached]:
            bpf.attach(pin_root, UNIT, path)
        assert len(bpf.stats(pin_root, UNIT)["attached"]) == attached
        flip = iter(range(10 ** 9))
        res = {
            "cgroups": count, "attached": attached,
            "stats_ms": median_ms(lambda: bpf.stats(pin_root, UNIT), rounds),
            "list_ms": median_ms(lambda: bpf.summary(pin_root), rounds),
            "reload_ms": median_ms(lambda: bpf.load(pin_root, UNIT, programs[next(flip) % 2], cache=cache), rounds),
            "cli_startup_ms": median_ms(lambda: cli(env, "--help"), rounds),
            "cli_stats_ms": median_ms(lambda: cli(env, "stats", UNIT), rounds),
            "cli_list_ms": median_ms(lambda: cli(env, "list"), rounds),
        }
        assert len(bpf.stats(pin_root, UNIT)["attached"]) == attached
        return res
    finally:
        try:
            bpf.unload(pin_root, UNIT)
        except Exception as e:  # noqa: BLE001 — cleanup
            print(f"cleanup: {e}", file=sys.stderr)
        if os.path.isdir(pin_root):
            os.rmdir(pin_root)
        remove_tree(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cgroups", default="100,10000")
    ap.add_argument("--attached", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="bpfwall-bench-cache-")
    os.chmod(cache, 0o700)
    results = []
    try:
        for count in (int(c) for c in a.cgroups.split(",")):
            r = measure(count, min(a.attached, count), a.rounds, cache)
            results.append(r)
            print(f"{count:>6} cgroups, {r['attached']} attached (median of {a.rounds}): "
                  f"stats {r['stats_ms']:.1f} ms, list {r['list_ms']:.1f} ms, reload {r['reload_ms']:.1f} ms "
                  f"in-process; CLI stats {r['cli_stats_ms']:.0f} ms, list {r['cli_list_ms']:.0f} ms "
                  f"(`bpfwall --help` {r['cli_startup_ms']:.0f} ms)")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print("growth {}→{} cgroups: stats {:.2f}×, list {:.2f}×, reload {:.2f}×".format(
            lo["cgroups"], hi["cgroups"], hi["stats_ms"] / lo["stats_ms"], hi["list_ms"] / lo["list_ms"],
            hi["reload_ms"] / lo["reload_ms"]))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
