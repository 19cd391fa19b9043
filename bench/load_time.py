#!/usr/bin/env python3
"""Wall time of `bpfwall load` as a user runs it: cold (empty cache: clang runs) and warm (cache hit).

Baseline in the same run: `bpfwall --help` (interpreter start-up + imports of
the CLI), so the ratio shows what loading adds. Writes bench/out/load_time.json.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from packets import FILTER  # noqa: E402

BPFWALL = os.path.join(os.path.dirname(sys.executable), "bpfwall")


def timed(args, env) -> float:
    t = time.perf_counter()
    subprocess.run([BPFWALL, *args], env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(rounds: int = 7) -> None:
    pin_root = f"/sys/fs/bpf/bpfwall-bench-{uuid.uuid4().hex[:8]}"
    cache = tempfile.mkdtemp(prefix="bpfwall-bench-cache-")
    os.chmod(cache, 0o700)
    env = dict(os.environ, BPFWALL_PIN_ROOT=pin_root, BPFWALL_CACHE_DIR=cache)
    cold, warm, startup = [], [], []
    try:
        for i in range(rounds):
            shutil.rmtree(cache)
            os.mkdir(cache, 0o700)
            startup.append(timed(["--help"], env))
            cold.append(timed(["load", f"bench-{i}.service", "--ingress", FILTER, "--egress", FILTER], env))
            warm.append(timed(["load", f"bench-{i}.service", "--ingress", FILTER, "--egress", FILTER], env))
            warm.append(timed(["load", f"bench-new-{i}.service", "--ingress", FILTER, "--egress", FILTER], env))
    finally:
        for unit in os.listdir(pin_root) if os.path.isdir(pin_root) else []:
            subprocess.run([BPFWALL, "unload", unit.replace("+", ".")], env=env, stdout=subprocess.DEVNULL)
        if os.path.isdir(pin_root):
            os.rmdir(pin_root)
        shutil.rmtree(cache, ignore_errors=True)
    res = {"startup_s": statistics.median(startup), "cold_s": statistics.median(cold),
           "warm_s": statistics.median(warm), "rounds": rounds}
    print(f"bpfwall load, median of {rounds}: cold {res['cold_s'] * 1000:.0f} ms, warm {res['warm_s'] * 1000:.0f} ms "
          f"(baseline `bpfwall --help` {res['startup_s'] * 1000:.0f} ms; warm/baseline {res['warm_s'] / res['startup_s']:.2f}×)")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "load_time.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
