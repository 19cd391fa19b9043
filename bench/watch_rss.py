#!/usr/bin/env python3
"""Memory of `bpfwall watch` policing 1,000 cgroups (target: RSS ≤ 60 MB).

Same-run baseline: the same watcher over an empty subtree. Measured three ways:
after the 1,000 cgroups appeared one by one while it ran (the event path), after a
restart that found them all (the reconcile path; its start-up time is reported too),
and the peak (VmHWM). Writes bench/out/watch_rss.json.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from watchbench import Bench, bpffs, cgroup, write_json  # noqa: E402

UNIT = "app-*.scope"
SLICES = 10  # 1,000 cgroups spread over 10 slices, as scopes are on a busy host


def mb(kib: int) -> float:
    return kib / 1024


def wait_all_attached(paths, prog_id, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    for path in paths:
        while prog_id not in cgroup.query(path, "ingress")[1]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{path}: not attached after {timeout_s} s")
            time.sleep(0.001)


def main(n: int = 1000) -> None:
    bpffs()
    with Bench("rss") as b:
        b.start()
        time.sleep(0.5)
        empty = b.rss_kib()

        paths = []
        for s in range(SLICES):
            os.mkdir(os.path.join(b.root, f"s{s}.slice"))
            for i in range(n // SLICES):
                path = os.path.join(b.root, f"s{s}.slice", f"app-{s}-{i}.scope")
                os.mkdir(path)
                paths.append(path)
        wait_all_attached(paths, b.prog_id(UNIT))
        time.sleep(0.5)
        events = b.rss_kib()

        b.stop()
        restart_s = b.start()
        time.sleep(0.5)
        reconciled = b.rss_kib()

    res = {"cgroups": n, "empty_kib": empty, "after_events_kib": events, "after_restart_kib": reconciled,
           "restart_to_ready_s": restart_s}
    print(f"bpfwall watch memory, {n} policed cgroups (target RSS ≤ 60 MB):")
    print(f"  baseline, empty subtree:       RSS {mb(empty['VmRSS']):.1f} MB")
    print(f"  after {n} cgroups appeared:   RSS {mb(events['VmRSS']):.1f} MB, peak {mb(events['VmHWM']):.1f} MB "
          f"({events['VmRSS'] / empty['VmRSS']:.2f}× baseline)")
    print(f"  restarted over {n} cgroups:   RSS {mb(reconciled['VmRSS']):.1f} MB, peak {mb(reconciled['VmHWM']):.1f} MB "
          f"({reconciled['VmRSS'] / empty['VmRSS']:.2f}× baseline); READY after {restart_s * 1000:.0f} ms")
    print(f"  wrote {write_json('watch_rss.json', res)}")


if __name__ == "__main__":
    main()
