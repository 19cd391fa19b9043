#!/usr/bin/env python3
"""Wall time of `bpfwall watch --once` with 100 distinct policed units, as at boot: nothing
pinned, no watcher state; warm (the compiled objects are in the cache) and cold (an empty
cache dir: every unit's object is compiled). Each unit has its own expression (so its own
object) and its own cgroup under the bench's subtree, which the run attaches to.

Target (issue 9): warm ≤ 1 s, cold ≤ 5 s on a 2-core machine; before the parallel build and
load it took 4.65 s warm and 19.4 s cold. Baseline in the same run: `watch --once` with an
empty policy (interpreter start-up, imports, the cgroup walk), the floor of any policy.
Median of ROUNDS runs each. CPU seconds beside each: on a shared machine the wall time also
measures the others, and CPU / CPUs is the wall time a quiet machine would show.

Then the compiles alone, cold, in this process: the 100 objects built one clang run per unit
(build() in turn on every CPU, as before batches) and by build_many (several units per clang
run, batch.py), each with clang's CPU seconds. Writes bench/out/watch_once.json.
"""
from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from watchbench import REPO, Bench, bpf, bpffs, write_json  # noqa: E402

from bpfwall.build import UnitProgram, build, build_many  # noqa: E402
from bpfwall.lang.checker import analyze_pair  # noqa: E402

UNITS = 100
ROUNDS = 5
BEFORE = {"warm_s": 4.65, "cold_s": 19.4}  # issue 9, one clang run and one load per unit in turn
TARGET = {"warm_s": 1.0, "cold_s": 5.0}


def expressions(i: int) -> tuple[str, str]:
    """Unit i's (ingress, egress): the ports differ, so the generated C does."""
    return f"tcp && local_port in {{{1000 + i}, {3000 + i}}} || icmp", f"udp && dst_port == {2000 + i} || tcp"


def policy(n: int) -> str:
    """n entries, each its own object."""
    return "".join(f'[units."bench-{i}.service"]\ningress = "{expressions(i)[0]}"\negress = "{expressions(i)[1]}"\n'
                   for i in range(n))


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def compiles(n: int, parent: str) -> dict[str, tuple[float, float]]:
    """(wall s, clang CPU s) of building the n units' objects with an empty cache (under
    `parent`: the cache refuses a directory others can write, like /tmp): one clang run per
    unit, on every CPU, then build_many's batches."""
    programs = [UnitProgram(*analyze_pair(*expressions(i))) for i in range(n)]
    cpus = len(os.sched_getaffinity(0))

    def one_per_unit(cache: Path) -> None:
        with ThreadPoolExecutor(cpus) as pool:
            list(pool.map(lambda p: build(p, cache), programs))

    out = {}
    for what, run in (("one_per_unit", one_per_unit), ("batches", lambda cache: build_many(programs, cache))):
        with tempfile.TemporaryDirectory(prefix="cache-", dir=parent) as cache:
            cpu, t = children_cpu(), time.perf_counter()
            run(Path(cache))
            out[what] = (time.perf_counter() - t, children_cpu() - cpu)
    return out


class OnceBench(Bench):
    def __init__(self, n: int):
        super().__init__("once", policy(n))
        self.cache = os.path.join(self.tmp, "cache")
        self.state = os.path.join(self.tmp, "state")
        for i in range(n):
            os.mkdir(os.path.join(self.root, f"bench-{i}.service"))

    def reset(self, cold: bool) -> None:
        """Back to boot: no pins, no state; `cold` also empties the cache."""
        if os.path.isdir(self.pin_root):
            for unit in bpf.units(self.pin_root):
                bpf.unload(self.pin_root, unit)
        shutil.rmtree(self.state, ignore_errors=True)
        if cold:
            shutil.rmtree(self.cache, ignore_errors=True)
        os.makedirs(self.cache, mode=0o700, exist_ok=True)

    def once(self, policy_dir: str | None = None) -> tuple[float, float]:
        """One run: (wall seconds, CPU seconds of it and its clang processes)."""
        env = dict(os.environ, BPFWALL_CACHE_DIR=self.cache, BPFWALL_LOG="stderr")
        env.pop("NOTIFY_SOCKET", None)
        cmd = [sys.executable, "-m", "bpfwall", "watch", "--once", "--cgroup-root", self.root,
               "--policy-dir", policy_dir or self.policy_dir, "--pin-root", self.pin_root, "--state-dir", self.state]
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        took, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"watch --once failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return took, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(n: int = UNITS, rounds: int = ROUNDS) -> None:
    bpffs()
    runs: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": [], "empty_policy": []}
    with OnceBench(n) as b:
        empty_dir = os.path.join(b.tmp, "empty-policy")
        os.mkdir(empty_dir)
        for _ in range(rounds):
            b.reset(cold=True)
            runs["empty_policy"].append(b.once(empty_dir))
            runs["cold"].append(b.once())
            b.reset(cold=False)
            runs["warm"].append(b.once())
        b.reset(cold=True)
        compiled = compiles(n, b.tmp)
    # CPU time beside the wall time: on a shared machine the wall time also measures the others.
    res = {"units": n, "rounds": rounds, "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
           "before": BEFORE, "target": TARGET}
    for what, values in runs.items():
        res[f"{what}_s"] = statistics.median(w for w, _ in values)
        res[f"{what}_cpu_s"] = statistics.median(c for _, c in values)
        res[f"{what}_all_s"] = [w for w, _ in values]
    print(f"bpfwall watch --once, {n} distinct units, median of {rounds} ({res['cpus']} CPUs, "
          f"load average {res['load_avg']:.1f}):")
    for what in ("warm", "cold"):
        key = f"{what}_s"
        print(f"  {what:4}  {res[key]:6.2f} s  (CPU {res[what + '_cpu_s']:5.2f} s)   "
              f"before: {BEFORE[key]:.2f} s, target ≤ {TARGET[key]:g} s")
    print(f"  baseline, an empty policy: {res['empty_policy_s']:.2f} s (CPU {res['empty_policy_cpu_s']:.2f} s)")
    res["compile"] = {what: {"wall_s": w, "clang_cpu_s": c} for what, (w, c) in compiled.items()}
    print(f"compiling the {n} objects alone, empty cache:")
    for what, r in res["compile"].items():
        print(f"  {what.replace('_', ' '):12}  {r['wall_s']:6.2f} s  (clang CPU {r['clang_cpu_s']:5.2f} s, "
              f"{r['clang_cpu_s'] / n * 1000:.0f} ms a unit)")
    print(f"  wrote {write_json('watch_once.json', res)}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
