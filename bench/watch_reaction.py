#!/usr/bin/env python3
"""How fast `bpfwall watch` polices a new cgroup: from mkdir to the moment BPF_PROG_QUERY on
the new cgroup shows both of the unit's programs (ingress and egress), 200 times, one at a
time (10 ms apart), then 200 created in one burst.

Baseline in the same run: this process doing mkdir + attach + query itself with the same
pinned programs (no watcher), the floor any watcher could reach. Writes bench/out/watch_reaction.json.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from watchbench import Bench, bpf, bpffs, cgroup, percentile, write_json  # noqa: E402

from bpfwall.kernel import pins  # noqa: E402

UNIT = "app-*.scope"


def attached(path: str, want: dict[str, int]) -> bool:
    return all(want[d] in cgroup.query(path, d)[1] for d in ("egress", "ingress"))


def until_attached(path: str, want: dict[str, int], start: int, timeout_s: float = 5.0) -> float:
    """Milliseconds from `start` (perf_counter_ns) until both programs show on the cgroup."""
    deadline = start + int(timeout_s * 1e9)
    while True:
        try:
            if attached(path, want):
                return (time.perf_counter_ns() - start) / 1e6
        except Exception:
            pass
        if time.perf_counter_ns() > deadline:
            raise SystemExit(f"{path}: not attached after {timeout_s} s")


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms), "mean_ms": statistics.fmean(ms)}


def main(n: int = 200) -> None:
    bpffs()
    with Bench("reaction") as b:
        b.start()
        want = {d: b.prog_id(UNIT, d) for d in ("ingress", "egress")}
        os.mkdir(os.path.join(b.root, "one.slice"))
        one = []
        for i in range(n):
            path = os.path.join(b.root, "one.slice", f"app-{i}.scope")
            t = time.perf_counter_ns()
            os.mkdir(path)
            one.append(until_attached(path, want, t))
            time.sleep(0.01)

        os.mkdir(os.path.join(b.root, "burst.slice"))
        paths = [os.path.join(b.root, "burst.slice", f"app-{i}.scope") for i in range(n)]
        t = time.perf_counter_ns()
        for path in paths:
            os.mkdir(path)
        burst_all = max(until_attached(p, want, t) for p in paths)
        b.stop()

        # Baseline: the same mkdir → attach → query, done by this process with the pinned programs.
        fds = {d: pins.get(bpf.prog_path(b.pin_root, UNIT, d)) for d in ("ingress", "egress")}
        os.mkdir(os.path.join(b.root, "base.slice"))
        base = []
        try:
            for i in range(n):
                path = os.path.join(b.root, "base.slice", f"app-{i}.scope")
                t = time.perf_counter_ns()
                os.mkdir(path)
                bpf.attach_programs(path, fds)
                base.append(until_attached(path, want, t))
        finally:
            for fd in fds.values():
                os.close(fd)

    res = {"one_at_a_time": summary(one), "burst": {"n": n, "all_attached_ms": burst_all},
           "baseline_in_process": summary(base)}
    r, f = res["one_at_a_time"], res["baseline_in_process"]
    print(f"bpfwall watch, cgroup created → both programs attached, {n} cgroups one at a time:")
    print(f"  p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms "
          f"(target p99 ≤ 10 ms)")
    print(f"  baseline (mkdir + attach in-process, no watcher): p50 {f['p50_ms']:.3f} ms, p99 {f['p99_ms']:.3f} ms; "
          f"watcher p50 / baseline p50 = {r['p50_ms'] / f['p50_ms']:.1f}×")
    print(f"  burst of {n} mkdirs: all attached {burst_all:.1f} ms after the first "
          f"({burst_all / n:.2f} ms per cgroup)")
    print(f"  wrote {write_json('watch_reaction.json', res)}")


if __name__ == "__main__":
    main()
