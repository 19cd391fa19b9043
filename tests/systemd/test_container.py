"""The harness itself: what it promises the other systemd tests.

- stop() leaves nothing: no overlay mount, work dir, cgroup, bpffs dir, process
  or BPF program of the container;
- a run killed before its stop() is cleaned up by the next run;
- a command inside cannot outlive its timeout;
- systemd inside has a working BPF firewall (the seccomp exception for bpf(2)).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bpfwall.kernel import progs
from bpfwall.kernel.errors import KernelError
from tests.systemd import container as ct
from tests.systemd.container import REPO
from tests.systemd.services import pin_path, pinned_prog_id

pytestmark = [pytest.mark.kernel, pytest.mark.systemd]


def prog_exists(prog_id: int) -> bool:
    try:
        fd = progs.prog_get_fd_by_id(prog_id)
    except KernelError:
        return False
    os.close(fd)
    return True


def assert_gone(name: str, workdir, cgroup_path: str, bpffs_dir: str, pids: list[int], prog_ids: list[int],
                nspawn_lock: str) -> None:
    assert nspawn_lock and not os.path.exists(nspawn_lock), nspawn_lock
    assert not os.path.exists(workdir), workdir
    assert not any(name in line for line in open("/proc/self/mountinfo")), f"{name} still mounted"
    assert not os.path.exists(cgroup_path), cgroup_path
    assert not os.path.exists(bpffs_dir), bpffs_dir
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid
    deadline = time.monotonic() + 5  # cgroup teardown frees attached programs from a workqueue
    while any(prog_exists(p) for p in prog_ids):
        assert time.monotonic() < deadline, f"programs {[p for p in prog_ids if prog_exists(p)]} outlived the container"
        time.sleep(0.05)


def test_stop_removes_everything_the_container_made(systemd_rootfs):
    c = ct.Container(systemd_rootfs, REPO)
    c.start()
    try:
        assert c.system_state in ("running", "degraded")
        c.bpfwall("load", "held.service", "--ingress", "udp", check=True)
        pin = pin_path(c, "held.service")
        c.systemd_run("--unit=held.service", f"--property=IPIngressFilterPath={pin}", "sleep", "600", check=True)
        prog = pinned_prog_id(c, pin)
        pids = [c.nspawn.pid, c.leader]
    finally:
        c.stop()
    assert c.nspawn.returncode is not None
    assert_gone(c.name, c.workdir, c.host_cgroup, c.bpffs_dir, pids, [prog], c.nspawn_lock)
    c.stop()  # a second stop is harmless


def test_a_run_killed_before_stop_is_reaped_by_the_next(systemd_rootfs):
    script = ("import sys, time; from pathlib import Path; from tests.systemd import container as ct; "
              f"c = ct.Container(Path({str(systemd_rootfs)!r}), Path({str(REPO)!r})); c.start(); "
              "print(c.name, c.nspawn.pid, c.leader, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        name, nspawn, leader = owner.stdout.readline().split()
    finally:
        owner.send_signal(signal.SIGKILL)  # no stop(): everything stays behind
        owner.wait()
    workdir = ct.WORK_ROOT / name
    assert workdir.is_dir() and os.path.exists(f"/proc/{leader}")
    state = json.loads((workdir / "state.json").read_text())
    assert os.path.exists(state["nspawn_lock"])  # held by the orphaned nspawn; reaping kills it (SIGKILL)
    assert name in ct.reap_stale()
    assert_gone(name, workdir, state["cgroup"], state["bpffs"], [int(nspawn), int(leader)], [], state["nspawn_lock"])


def test_exec_is_bounded_by_its_timeout(container):
    started = time.monotonic()
    proc = container.exec(["sleep", "300"], timeout=1)
    assert proc.returncode == 124  # timeout(1): the command was stopped
    assert time.monotonic() - started < 10
    left = container.exec(["ps", "-eo", "args"], check=True).stdout.splitlines()
    assert "sleep 300" not in left  # nsenter's child died with it


def test_systemd_inside_has_a_working_bpf_firewall(container):
    """IPAddressDeny= is systemd's own cgroup BPF program: it only works if bpf(2) passes nspawn's seccomp."""
    allowed = container.exec(["ping", "-c", "1", "-W", "1", "127.0.0.1"])
    assert allowed.returncode == 0, allowed.stderr
    denied = container.systemd_run("--wait", "--pipe", "--property=IPAddressDeny=any",
                                   "ping", "-c", "1", "-W", "1", "127.0.0.1")
    assert denied.returncode != 0
    assert "1 packets transmitted, 0 received" in denied.stdout
