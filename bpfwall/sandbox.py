"""Cgroups of our own for the demo, the tests and `bpfwall run`.

A cgroup_skb program filters the sockets whose cgroup it is attached to, and
a socket belongs to the cgroup of the process that created it. So a socket
made while this process sits in cgroup X stays X's after we move back.
"""
from __future__ import annotations

import ctypes
import os
import socket
import uuid
from contextlib import contextmanager

from .kernel import cgroup


def own_cgroup_path() -> str:
    """This process's cgroup2 directory (the '0::' line of /proc/self/cgroup)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                rel = line.strip()[3:]
                return os.path.join(cgroup.cgroup2_mount(), rel.lstrip("/"))
    raise RuntimeError("this process has no cgroup2 membership")


class TempCgroup:
    """A uniquely named cgroup under the cgroup2 mount, removed on exit."""

    def __init__(self, prefix: str = "bpfwall-tmp", suffix: str = "", parent: str | None = None,
                 name: str | None = None):
        """`name` (default: prefix-<random>suffix) under `parent` (default: the cgroup2 mount)."""
        name = name or f"{prefix}-{uuid.uuid4().hex[:10]}{suffix}"
        self.path = os.path.join(parent or cgroup.cgroup2_mount(), name)

    def __enter__(self) -> "TempCgroup":
        os.mkdir(self.path)
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        if not os.path.isdir(self.path):
            return
        # Move back anything we left inside (only our own PIDs can be there).
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                leftovers = [int(x) for x in f.read().split()]
        except OSError:
            leftovers = []
        if leftovers:
            parent = os.path.join(os.path.dirname(self.path), "cgroup.procs")
            for pid in leftovers:
                try:
                    with open(parent, "w") as f:
                        f.write(str(pid))
                except OSError:
                    pass
        os.rmdir(self.path)

    @contextmanager
    def entered(self):
        """Run the body with this process inside the cgroup, then move back."""
        home = own_cgroup_path()
        _join(self.path)
        try:
            yield
        finally:
            _join(home)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=0) -> socket.socket:
        with self.entered():
            return socket.socket(family, type, proto)

    def join_in_child(self) -> None:
        """For subprocess preexec_fn: the child enters the cgroup before exec."""
        _join(self.path)


def _join(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")


# -- a process born inside a cgroup ----------------------------------------------

CLONE_INTO_CGROUP = 0x200000000
SYS_CLONE3 = 435  # the same number on every architecture
SIGCHLD = 17


class _CloneArgs(ctypes.Structure):  # struct clone_args, CLONE_ARGS_SIZE_VER2
    _fields_ = [(n, ctypes.c_uint64) for n in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack",
                                                "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


def clone_into(cgroup_fd: int) -> int:
    """fork(), the child born in the cgroup `cgroup_fd` (clone3 CLONE_INTO_CGROUP: it never runs
    outside it, unlike a process that moves in): its pid in the parent, 0 in the child. Raw
    clone3, so Python's fork hooks do not run: for single-threaded callers (tests, benches)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    args = _CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=SIGCHLD, cgroup=cgroup_fd)
    pid = libc.syscall(SYS_CLONE3, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone3(CLONE_INTO_CGROUP)")
    return pid
