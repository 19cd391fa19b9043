#!/usr/bin/env python3
"""Loopback UDP throughput through 1, 100 and 1,000 policed units, per backend, vs no filter.

A bench subtree of sibling cgroups, one unit each, every unit with the same
filter in both directions; iperf3 sends 64-byte UDP datagrams as fast as it can
from one of them (egress) or to one of them (ingress). Configurations:

  none        the same cgroups, nothing attached (the same-run baseline)
  bpf         each unit's cgroup_skb programs attached to its cgroup
  nft         the nft backend: one table, one `socket cgroupv2 level N vmap` rule per level
  nft-linear  one `socket cgroupv2 level 2 "<path>" jump <unit chain>` rule per unit (the
              layout the vmap replaces: each rule costs a socket lookup on input)
  nft-hooks   (optional) input/output base chains without rules: what any nft table costs
  bpf-empty   (optional) a two-instruction cgroup_skb program (`return 1`) on every unit:
              what running any cgroup_skb program costs before it reads a byte

The policed iperf3 end sits in the last unit, so a linear list walks every rule
to find it, and the other end (outside every unit) walks every rule on input
without a match. Each configuration runs in a private network namespace of its
own (identical ones): the host's traffic never meets these tables, and the nft
tables stay loaded between runs without slowing the other configurations.

The figure is packets/s as sent by the iperf3 client: on loopback the receive
path (nft input, cgroup ingress, socket enqueue) runs in the sender's softirq, so
every sent datagram has crossed every filter; the receiver (a single recv loop)
is slower and its rate is reported too. Rounds interleave the configurations
(rotating their order); each run is divided by the same round's `none` run at the
same unit count, and the median of those ratios is reported (with its range).
Writes bench/out/throughput.{json,png}.

    .venv/bin/python bench/throughput.py [--quick] [--units 1,100,1000] [--rounds 7] [--seconds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench.plot import plot_lines  # noqa: E402
from bpfwall.backends import bpf, nft  # noqa: E402
from bpfwall.build import UnitProgram  # noqa: E402
from bpfwall.kernel import cgroup, progs  # noqa: E402
from bpfwall.kernel import syscall as sc  # noqa: E402
from bpfwall.lang.checker import analyze  # noqa: E402
from bpfwall.nft import runner as nft_runner  # noqa: E402
from tests.kernel.realpackets import NetNamespace  # noqa: E402

PORT = 5201
# One filter for both directions and every unit, client or server of iperf3's port:
# datagrams to the server or DNS, the server's own traffic, and any TCP (iperf3's control).
FILTER = f"udp && (remote_port in {{{PORT}, 53}} || local_port == {PORT}) || tcp"
OUT = os.path.join(HERE, "out")


# -- the policed units ------------------------------------------------------------

class BenchTree:
    """<cgroup2>/bpfwall-bench-<id>/u0000 … one cgroup per unit; removed (children first) on close."""

    def __init__(self):
        self.name = f"bpfwall-bench-{uuid.uuid4().hex[:10]}"
        self.root = os.path.join(cgroup.cgroup2_mount(), self.name)
        self.count = 0
        os.mkdir(self.root)

    def grow(self, n: int) -> None:
        while self.count < n:
            os.mkdir(self.path(self.count))
            self.count += 1

    def path(self, i: int) -> str:
        return os.path.join(self.root, f"u{i:04d}")

    def relative(self, i: int) -> str:
        """As nft names it: relative to the cgroup2 root."""
        return f"{self.name}/u{i:04d}"

    @staticmethod
    def unit(i: int) -> str:
        return f"bench-{i:04d}.service"

    def join_in_child(self, i: int):
        path = os.path.join(self.path(i), "cgroup.procs")

        def join():
            with open(path, "w") as f:
                f.write("0")
        return join

    def close(self) -> None:
        for i in reversed(range(self.count)):
            os.rmdir(self.path(i))
        os.rmdir(self.root)


# -- configurations -----------------------------------------------------------------
#
# Each configuration runs its iperf3 pairs in a network namespace of its own. nft rules
# belong to a namespace, so the nft tables stay loaded for a whole unit count without
# touching the other configurations' traffic; cgroup_skb programs are global, so the bpf
# configuration attaches them only while its own runs go.

class Config:
    name = "none"

    def __init__(self):
        self.netns = NetNamespace("bpfwall-bench").create()

    def prepare(self, tree, n):
        """Make `n` units ready (in self.netns); slow work belongs here, not in apply."""

    def apply(self, tree, n):
        """Make the configuration effective for this configuration's runs."""

    def remove(self, tree, n):
        """Undo apply."""

    def close(self, tree):
        """Remove everything (in self.netns)."""


class BpfUnits(Config):
    """Units loaded once (pins), attached to their cgroups only while this configuration runs."""
    name = "bpf"

    def __init__(self, cache: pathlib.Path):
        super().__init__()
        self.pin_root = f"/sys/fs/bpf/bpfwall-bench-{uuid.uuid4().hex[:10]}"
        self.cache = cache
        self.program = UnitProgram(analyze(FILTER), analyze(FILTER))
        self.loaded = 0
        self.attached = 0

    def prepare(self, tree, n):
        for i in range(self.loaded, n):
            bpf.load(self.pin_root, tree.unit(i), self.program, cache=self.cache)
            self.loaded = i + 1

    def apply(self, tree, n):
        for i in range(n):
            bpf.attach(self.pin_root, tree.unit(i), tree.path(i))
            self.attached = i + 1

    def remove(self, tree, n):
        while self.attached:
            bpf.detach(self.pin_root, tree.unit(self.attached - 1), tree.path(self.attached - 1))
            self.attached -= 1

    def close(self, tree):
        self.remove(tree, self.attached)
        for i in range(self.loaded):
            bpf.unload(self.pin_root, tree.unit(i))
        if os.path.isdir(self.pin_root):
            os.rmdir(self.pin_root)


class BpfEmpty(Config):
    """Optional reference: `r0 = 1; exit` attached to every unit in both directions, the floor of
    any cgroup_skb filter (the kernel's per-packet cost of running a program at all)."""
    name = "bpf-empty"
    ACCEPT_ALL = bytes.fromhex("b700000001000000" "9500000000000000")  # mov64 r0, 1; exit

    def __init__(self):
        super().__init__()
        self.fds = {d: progs.prog_load(sc.BPF_PROG_TYPE_CGROUP_SKB, self.ACCEPT_ALL, "GPL", t, "bench_empty")
                    for d, t in (("ingress", sc.BPF_CGROUP_INET_INGRESS), ("egress", sc.BPF_CGROUP_INET_EGRESS))}
        self.attached = 0

    def apply(self, tree, n):
        for i in range(n):
            for direction, fd in self.fds.items():
                cgroup.attach(tree.path(i), fd, direction)
            self.attached = i + 1

    def remove(self, tree, n):
        while self.attached:
            for direction, fd in self.fds.items():
                cgroup.detach(tree.path(self.attached - 1), fd, direction)
            self.attached -= 1

    def close(self, tree):
        if tree is not None:
            self.remove(tree, self.attached)
        for fd in self.fds.values():
            os.close(fd)


class NftUnits(Config):
    """The nft backend: every unit loaded and attached to its cgroup, in one table."""
    name = "nft"

    def __init__(self):
        super().__init__()
        self.table = f"bpfwall-bench-{uuid.uuid4().hex[:10]}"
        self.program = UnitProgram(analyze(FILTER), analyze(FILTER))
        self.ready = 0

    def prepare(self, tree, n):
        nft_runner.reset()  # its libnftables worker must live in this namespace
        for i in range(self.ready, n):
            nft.load(self.table, tree.unit(i), self.program)
            nft.attach(self.table, tree.unit(i), tree.path(i))
            self.ready = i + 1

    def close(self, tree):
        if self.ready:
            nft_runner.reset()
            nft.destroy(self.table)
        nft_runner.reset()


def nft_with_cgroup2(script: str) -> None:
    """nft resolves `socket cgroupv2` paths under /sys/fs/cgroup only: on a hybrid host, run it in a
    private mount namespace with cgroup2 mounted there (the rules it installs are global)."""
    with tempfile.NamedTemporaryFile("w", suffix=".nft") as f:
        f.write(script)
        f.flush()
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        f"mount -t cgroup2 none /sys/fs/cgroup && nft -f {f.name}"], check=True)


class NftLinear(Config):
    """One rule per unit, `socket cgroupv2 level 2 "<path>" jump <unit chain>`, in a table of its own.

    The unit chains are written by hand here (the same filter, then drop): only the dispatch
    differs from the nft backend's table, and the chain runs for the policed unit's packets only."""
    name = "nft-linear"

    # FILTER in each direction (egress: remote = destination; ingress: remote = source), then drop.
    BODY = {"output": f"udp dport {{ {PORT}, 53 }} accept; udp sport {PORT} accept; meta l4proto tcp accept; drop",
            "input": f"udp sport {{ {PORT}, 53 }} accept; udp dport {PORT} accept; meta l4proto tcp accept; drop"}

    def __init__(self):
        super().__init__()
        self.table = f"bpfwall-bench-linear-{uuid.uuid4().hex[:8]}"
        self.present = False

    def script(self, tree, n: int) -> str:
        lines = [f"table inet {self.table} {{"]
        for hook, body in self.BODY.items():
            lines += [f"  chain {hook}_{i} {{ {body}; }}" for i in range(n)]
        for hook in self.BODY:
            lines.append(f"  chain {hook} {{\n    type filter hook {hook} priority 0; policy accept;")
            lines += [f'    socket cgroupv2 level 2 "{tree.relative(i)}" jump {hook}_{i}' for i in range(n)]
            lines.append("  }")
        return "\n".join(lines + ["}"]) + "\n"

    def prepare(self, tree, n):
        self.close(tree)
        nft_with_cgroup2(self.script(tree, n))
        self.present = True

    def close(self, tree):
        if self.present:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=True)
            self.present = False


class NftHooks(NftLinear):
    """Optional reference: the same input/output base chains with no rule at all, the floor
    of any nft configuration (what hooking netfilter costs before the first match)."""
    name = "nft-hooks"

    def prepare(self, tree, n):
        super().prepare(tree, 0)


# -- one measurement -----------------------------------------------------------------

def _server_ready(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Wait for iperf3's "Server listening" line (read unbuffered: select sees the pipe, not a buffer)."""
    deadline, seen = time.monotonic() + timeout, b""
    while b"listening" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise RuntimeError("iperf3 server did not start")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"iperf3 server exited: {seen.decode(errors='replace')}")
        seen += chunk


def iperf(tree: BenchTree, policed: int, direction: str, seconds: float) -> dict:
    """One iperf3 UDP run; the client (egress) or the server (ingress) in unit `policed`."""
    join = tree.join_in_child(policed)
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(PORT), "-A", "1", "--forceflush"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              preexec_fn=join if direction == "ingress" else None)
    try:
        _server_ready(server)
        client = subprocess.run(["iperf3", "-c", "127.0.0.1", "-u", "-b", "0", "-l", "64", "-t", str(seconds),
                                 "-J", "-p", str(PORT), "-A", "0"], capture_output=True, timeout=seconds + 30,
                                preexec_fn=join if direction == "egress" else None)
        result = json.loads(client.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3: {result['error']}")
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
    sent, received = result["end"]["sum_sent"], result["end"]["sum_received"]
    return {"sent_pps": sent["packets"] / sent["seconds"],
            "received_pps": (received["packets"] - received["lost_packets"]) / received["seconds"]}


# -- the run -----------------------------------------------------------------------------

def configurations(names: list[str], cache: pathlib.Path) -> list:
    made = {"none": Config, "bpf": lambda: BpfUnits(cache), "nft": NftUnits, "nft-linear": NftLinear,
            "nft-hooks": NftHooks, "bpf-empty": BpfEmpty}
    out = []
    try:
        for n in names:
            out.append(made[n]())
    except BaseException:
        close_all(out, None)
        raise
    return out


def close_all(configs: list, tree) -> None:
    for config in configs:
        try:
            if tree is not None:
                with config.netns.entered():
                    config.close(tree)
        finally:
            config.netns.remove()


def measure(args, tree: BenchTree, configs: list) -> list[dict]:
    rows = []
    for n in args.units:
        tree.grow(n)
        for config in configs:
            t = time.perf_counter()
            with config.netns.entered():
                config.prepare(tree, n)
            if n > 1:
                print(f"  {config.name}: {n} units ready in {time.perf_counter() - t:.1f} s", flush=True)
        samples = {(c.name, d): [] for c in configs for d in args.directions}
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate: drift hits all alike
            for config in order:
                with config.netns.entered():
                    config.apply(tree, n)
                    try:
                        for direction in args.directions:
                            samples[(config.name, direction)].append(iperf(tree, n - 1, direction, args.seconds))
                    finally:
                        config.remove(tree, n)
            print(f"  units {n}: round {r + 1}/{args.rounds} done", flush=True)
        for (name, direction), runs in samples.items():
            base = samples[("none", direction)]
            # Each round's run against the same round's baseline: slow drift (other load on the
            # machine) cancels; the median over rounds resists bursts.
            ratios = [run["sent_pps"] / b["sent_pps"] for run, b in zip(runs, base, strict=False)]
            rows.append({"units": n, "config": name, "direction": direction,
                         "sent_pps": statistics.median(x["sent_pps"] for x in runs),
                         "received_pps": statistics.median(x["received_pps"] for x in runs),
                         "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                         "received_ratio": statistics.median(
                             run["received_pps"] / b["received_pps"] for run, b in zip(runs, base, strict=False)),
                         "runs": runs})
    return rows


def report(args, rows: list[dict]) -> None:
    print(f"\nfilter (both directions, every unit): {FILTER}")
    print(f"iperf3 UDP, 64-byte datagrams, -b 0, {args.seconds} s per run, {args.rounds} interleaved rounds; "
          "pps: median; ratio: median over rounds of (pps / same round's no-filter pps), [min–max]")
    print(f"{'direction':<9} {'units':>5} {'config':<11} {'sent pps':>10} {'ratio':>6} {'range':>11} "
          f"{'recv pps':>10} {'ratio':>6}")
    for r in sorted(rows, key=lambda r: (r["direction"], r["units"], r["config"] != "none", r["config"])):
        spread = f"{r['ratio_min']:.2f}–{r['ratio_max']:.2f}"
        print(f"{r['direction']:<9} {r['units']:>5} {r['config']:<11} {r['sent_pps']:>10,.0f} {r['ratio']:>6.2f} "
              f"{spread:>11} {r['received_pps']:>10,.0f} {r['received_ratio']:>6.2f}")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "throughput.json"), "w") as f:
        json.dump({"filter": FILTER, "seconds": args.seconds,
                   "rounds": args.rounds, "datagram_bytes": 64, "rows": rows}, f, indent=2)
    series: dict = {}
    for r in rows:
        if r["config"] != "none":
            series.setdefault(f"{r['config']} ({r['direction']})", []).append((r["units"], r["ratio"]))
    plot_lines(series, os.path.join(OUT, "throughput.png"), logx=True, reference=0.95,
               title=f"Loopback UDP (64-byte datagrams) through policed units\n"
                     f"packets/s sent, ratio to no filter (median of {args.rounds} rounds)",
               xlabel="policed units", ylabel="ratio to no filter")
    print(f"wrote {os.path.join(OUT, 'throughput.json')} and throughput.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run: 1 and 100 units, 1 s, 2 rounds, egress")
    ap.add_argument("--units", default="1,100,1000")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--directions", default="egress,ingress")
    ap.add_argument("--configs", default="none,bpf,nft,nft-linear",
                    help="comma-separated: none, bpf, nft, nft-linear, nft-hooks (base chains without rules), "
                         "bpf-empty (an accept-all cgroup_skb program)")
    args = ap.parse_args()
    if args.quick:
        args.units, args.rounds, args.seconds, args.directions = "1,100", 2, 1, "egress"
    args.units = [int(u) for u in args.units.split(",")]
    args.directions = args.directions.split(",")
    names = args.configs.split(",")
    if "none" not in names:
        names.insert(0, "none")
    if shutil.which("iperf3") is None:
        sys.exit("iperf3 is not installed (apt-get install iperf3)")
    if os.geteuid() != 0:
        sys.exit("bench/throughput.py needs root (cgroups, BPF, nftables, network namespaces)")

    scratch = tempfile.mkdtemp(prefix="bpfwall-bench-")
    os.chmod(scratch, 0o700)
    cache = pathlib.Path(scratch, "cache")
    cache.mkdir()
    os.environ["BPFWALL_NFT_STATE_DIR"] = os.path.join(scratch, "nft-state")
    try:
        tree = BenchTree()
        try:
            configs = configurations(names, cache)
            try:
                rows = measure(args, tree, configs)
            finally:
                close_all(configs, tree)
        finally:
            tree.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(args, rows)


if __name__ == "__main__":
    main()
