#!/usr/bin/env python3
"""The unfiltered window of the watcher path: how long a restarted unit's first packets pass
before `bpfwall watch` attaches its filter, and how many.

A restart, the way systemd does it: the unit's cgroup is created (mkdir), a fresh process is
put into it and at once sends UDP datagrams in a tight loop — each carrying a sequence
number and its send time (CLOCK_MONOTONIC) — to a receiver outside the cgroup, on a port the
unit's egress filter DROPS. Every datagram that arrives passed unfiltered. Per restart: the
datagrams leaked, and the window = send time of the last leaked one − time of the mkdir.

Two ways into the cgroup, both with no exec and no service start-up in between (the worst
case for the watcher; a real unit spends longer before its first packet):
  join   a pre-forked process writes itself into cgroup.procs (what systemd 252 does for
         the child it forked). The move waits for an RCU grace period (cgroup_threadgroup_rwsem):
         ~10 ms here, usually longer than the watcher takes to attach.
  born   clone3(CLONE_INTO_CGROUP) right after the mkdir: the process starts inside the cgroup,
         no move to wait for (what a spawner using CLONE_INTO_CGROUP gets). The adversarial case.

Configurations, same harness, same run:
  watcher, bpf   the real `bpfwall watch` attaches the pinned programs on IN_CREATE
  watcher, bpf, strict   the same with the unit's cgroup in a slice whose default is strict:
                 the slice's guard drops it until the watcher has attached its filter and
                 classified it (goal: 0 datagrams, 0 ms)
  watcher, nft   the same with a backend = "nft" entry (map element added by the watcher)
  hand-off, bpf  the programs are attached before the process moves in (what systemd does with
                 IPEgressFilterPath=): window 0 by construction, measured to check the harness
A datagram refused by the filter makes sendto() fail with EPERM, so the sender also counts the
refused ones: leaked + refused = sent checks that no datagram was lost elsewhere. The socket is
made before the watcher attaches, yet every send after the first refusal is refused too: the
filter runs per packet on existing sockets, so the window ends when the attach lands.

Runs in a network namespace of its own (nothing outside it sees the nft table). Writes
bench/out/watch_window.json.
"""
from __future__ import annotations

import ctypes
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from watchbench import Bench, bpf, bpffs, percentile, write_json  # noqa: E402

from bpfwall.kernel import cgroup, pins  # noqa: E402
from bpfwall.sandbox import clone_into  # noqa: E402

ENTRY = "app-*.scope"        # the policy entry: a glob, as for desktop scopes
UNIT = "app-window.scope"    # the unit restarted
STEADY = "app-steady.scope"  # a unit that stays up beside it, so (nft) its level's map stays in use
SEND_MS = 100          # each restarted process sends for this long
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000
DATAGRAM = struct.Struct("=QQ")  # sequence number, send time (ns, CLOCK_MONOTONIC)
REPORT = struct.Struct("=QQqq")  # sent, refused, first refused (ns or -1), first send (ns)
STRICT_SLICE = "window.slice"  # the strict row: the unit's cgroup lies in a strict slice


def policy(port: int, backend: str, strict: bool = False) -> str:
    return (f'[units."{ENTRY}"]\negress = "!(udp && remote_port == {port})"\n'
            + ('backend = "nft"\n' if backend == "nft" else "")
            + (f'[units."{STRICT_SLICE}"]\negress = "true"\nstrict = true\n' if strict else ""))


# -- the restarted unit's process ----------------------------------------------------------

def send(report: int, port: int) -> None:
    """The unit's process, inside its cgroup: send for SEND_MS, report, exit."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # made now, before the watcher attaches
    addr = ("127.0.0.1", port)
    sent = refused = 0
    first_refused = -1
    now = time.monotonic_ns
    first = now()
    end = first + SEND_MS * 1_000_000
    while (t := now()) < end:
        try:
            s.sendto(DATAGRAM.pack(sent, t), addr)
        except PermissionError:
            refused += 1
            if first_refused < 0:
                first_refused = t
        sent += 1
    os.write(report, REPORT.pack(sent, refused, first_refused, first))


def _child(body) -> None:
    code = 1
    try:
        body()
        code = 0
    finally:
        os._exit(code)


def restart(path: str, port: int, rx: socket.socket, how: str, before_start=None) -> dict:
    """One restart: mkdir, (before_start), the process gets in ("join" | "born") and sends;
    what arrived."""
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = None
    if how == "join":
        pid = os.fork()  # before the mkdir: fork is not counted, only the move
        if pid == 0:
            def joined():
                path_ = os.read(go_r, 4096).decode()
                with open(os.path.join(path_, "cgroup.procs"), "w") as f:
                    f.write("0")
                send(rep_w, port)
            _child(joined)
    try:
        t0 = time.monotonic_ns()
        os.mkdir(path)
        if before_start is not None:
            before_start(path)
        if how == "join":
            os.write(go_w, path.encode())
        else:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                pid = clone_into(fd)
                if pid == 0:
                    _child(lambda: send(rep_w, port))
            finally:
                os.close(fd)
        os.close(rep_w)
        rep_w = -1
        data = os.read(rep_r, REPORT.size)
    finally:
        for fd in (go_r, go_w, rep_r, rep_w):
            if fd >= 0:
                os.close(fd)
        status = os.waitpid(pid, 0)[1] if pid else 0
    if len(data) != REPORT.size or os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("the sender process failed")
    sent, refused, first_refused, first_send = REPORT.unpack(data)
    leaked = []
    while True:
        try:
            leaked.append(DATAGRAM.unpack(rx.recv(64)))
        except BlockingIOError:
            break
    os.rmdir(path)
    last = max((ts for _, ts in leaked), default=None)
    return {
        "sent": sent, "refused": refused, "leaked": len(leaked),
        "window_ms": (last - t0) / 1e6 if last is not None else 0.0,
        "first_send_ms": (first_send - t0) / 1e6,
        "first_refused_ms": (first_refused - t0) / 1e6 if first_refused >= 0 else None,
        # the filter works on the socket made before it was attached: nothing passes after a refusal
        "leak_after_refusal": any(ts > first_refused for _, ts in leaked) if first_refused >= 0 else False,
    }


# -- configurations ------------------------------------------------------------------------

def summary(runs: list[dict]) -> dict:
    windows = [r["window_ms"] for r in runs]
    leaked = [r["leaked"] for r in runs]
    first = [r["first_send_ms"] for r in runs]
    return {
        "restarts": len(runs),
        "window_ms": {"p50": statistics.median(windows), "p99": percentile(windows, 99), "max": max(windows),
                      "mean": statistics.fmean(windows)},
        "leaked": {"p50": statistics.median(leaked), "p99": percentile(leaked, 99), "max": max(leaked),
                   "total": sum(leaked)},
        "first_send_ms": {"p50": statistics.median(first), "p99": percentile(first, 99), "max": max(first)},
        "restarts_with_leak": sum(1 for n in leaked if n),
        "sent_total": sum(r["sent"] for r in runs),
        "never_refused": sum(1 for r in runs if r["first_refused_ms"] is None),
        "leaks_after_first_refusal": sum(1 for r in runs if r["leak_after_refusal"]),
        "lost_elsewhere": sum(r["sent"] - r["refused"] - r["leaked"] for r in runs),
    }


def receiver() -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 256 << 20)  # every leaked datagram fits
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    return rx


def watcher_runs(backend: str, n: int, hows, strict: bool = False) -> dict[str, list[dict]]:
    """The real watcher running; {how: runs}. `strict`: the unit's cgroup lies in a strict slice
    (whose default lets everything out once a cgroup is classified)."""
    with receiver() as rx:
        port = rx.getsockname()[1]
        with Bench(f"window-{backend}{'-strict' if strict else ''}", policy(port, backend, strict)) as b:
            parent = os.path.join(b.root, STRICT_SLICE) if strict else b.root
            os.makedirs(os.path.join(parent, STEADY))
            b.start()
            path = os.path.join(parent, UNIT)
            return {how: [restart(path, port, rx, how) for _ in range(n)] for how in hows}


def unwatched_runs(n: int, hows, attach: bool) -> dict[str, list[dict]]:
    """No watcher: the programs attached before the process starts (hand-off), or never
    (the control: every datagram must arrive, or the harness could not see a leak)."""
    with receiver() as rx:
        port = rx.getsockname()[1]
        with Bench("window-handoff", policy(port, "bpf")) as b:
            b.start()  # only to load and pin the unit's programs, as bpfwall@.service would
            b.stop()
            fds = {"egress": pins.get(bpf.prog_path(b.pin_root, ENTRY, "egress"))}
            # what systemd does for IPEgressFilterPath=: BPF_PROG_ATTACH (multi) before the process starts
            before = (lambda p: cgroup.attach(p, fds["egress"], "egress")) if attach else None
            try:
                path = os.path.join(b.root, UNIT)
                return {how: [restart(path, port, rx, how, before) for _ in range(n)] for how in hows}
            finally:
                for fd in fds.values():
                    os.close(fd)


# -- a network namespace of our own ----------------------------------------------------------

def enter_new_netns() -> str:
    name = f"bpfwall-bench-window-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)
    return name


def show(label: str, s: dict) -> None:
    w, k, f = s["window_ms"], s["leaked"], s["first_send_ms"]
    print(f"  {label:<24} window p50 {w['p50']:6.2f} ms, p99 {w['p99']:6.2f} ms, max {w['max']:6.2f} ms | "
          f"leaked p50 {k['p50']:5.0f}, p99 {k['p99']:5.0f}, max {k['max']:5} "
          f"({s['restarts_with_leak']:3}/{s['restarts']} restarts) | first send p50 {f['p50']:.2f} ms")
    problems = [f"{s[key]} {what}" for key, what in (("never_refused", f"restarts never filtered within {SEND_MS} ms"),
                                                      ("leaks_after_first_refusal", "restarts leaked after a refusal"),
                                                      ("lost_elsewhere", "datagrams lost elsewhere")) if s[key]]
    if problems and not label.startswith("control"):
        print(f"  {'':<24} !! " + ", ".join(problems))


HOWS = ("born", "join")


def main(n: int = 100) -> None:
    bpffs()
    netns = enter_new_netns()
    state = tempfile.mkdtemp(prefix="bpfwall-bench-window-nft-")
    os.environ["BPFWALL_NFT_STATE_DIR"] = state
    os.environ["BPFWALL_NFT_TABLE"] = f"bpfwall-bench-{uuid.uuid4().hex[:8]}"
    runs = {}
    try:
        for how, r in watcher_runs("bpf", n, HOWS).items():
            runs[f"watcher_bpf_{how}"] = r
        for how, r in watcher_runs("bpf", n, HOWS, strict=True).items():
            runs[f"watcher_bpf_strict_{how}"] = r
        for how, r in watcher_runs("nft", n, HOWS).items():
            runs[f"watcher_nft_{how}"] = r
        for how, r in unwatched_runs(n, HOWS, attach=True).items():
            runs[f"handoff_bpf_{how}"] = r
        runs["control_unfiltered_born"] = unwatched_runs(max(3, n // 20), ("born",), attach=False)["born"]
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)  # takes the nft table with it
        subprocess.run(["rm", "-rf", state], check=False)
    results = {name: summary(r) for name, r in runs.items()}
    print(f"unfiltered window of a restarted unit: mkdir, then a fresh process in the cgroup sends UDP to a port "
          f"its egress filter drops, for {SEND_MS} ms; {n} restarts each")
    print("  born: clone3(CLONE_INTO_CGROUP) after the mkdir; join: writes itself into cgroup.procs (systemd 252)")
    for name, s in results.items():
        show(name.replace("_", " "), s)
    c, wb = results["control_unfiltered_born"], results["watcher_bpf_born"]
    print(f"  control (no filter): {c['leaked']['total']} of {c['sent_total']} datagrams arrived; "
          f"one send every {SEND_MS * 1e3 * wb['restarts'] / max(1, wb['sent_total']):.1f} µs")
    after = sum(s["leaks_after_first_refusal"] for s in results.values())
    print(f"  sockets made before the attach are filtered from the attach on ({after} datagrams passed after a "
          "refusal): cgroup_skb and nft run per packet, so the window ends when the watcher's attach lands")
    wn = results["watcher_nft_born"]
    if wb["window_ms"]["p50"] > 0:
        print(f"  born: nft window p50 / bpf window p50 = {wn['window_ms']['p50'] / wb['window_ms']['p50']:.1f}×")
    print(f"  wrote {write_json('watch_window.json', {'restarts': n, 'send_ms': SEND_MS, 'configs': results})}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
