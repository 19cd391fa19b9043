"""The slice guard reads a packet's cgroup id with four loads through bpf_cast_to_kern_ctx()
(kernel/vmlinux.py) where the kernel allows it, else with bpf_skb_cgroup_id(). Both builds must
see the same cgroup on real traffic, both directions, UDP and TCP (a SYN-ACK leaves from a request
socket: the kernel hands the programs the listener), and the offsets must be the running
kernel's own, as clang reads them from bpftool's dump of its types."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
from contextlib import ExitStack

import pytest

from bpfwall import build as bpfwall_build, program_contract as pc
from bpfwall.backends.bpf_guard import GuardMap
from bpfwall.build import UnitProgram, build
from bpfwall.kernel import cgroup, loader, vmlinux
from bpfwall.kernel.errors import KernelError
from bpfwall.lang.checker import analyze
from bpfwall.sandbox import TempCgroup
from tests.kernel.sockets import receive_all

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

PLACEHOLDER = vmlinux.kfunc_placeholder("bpf_cast_to_kern_ctx")


def calls(obj, number: int) -> int:
    """How many helper calls of `number` the object's egress program makes."""
    insns = obj.programs["cgroup_skb/egress"].insns
    return sum(1 for off in range(0, len(insns), 8)
               if insns[off] == 0x85 and not insns[off + 1] >> 4
               and struct.unpack_from("=i", insns, off + 4)[0] == number)


def guard_object(tmp_path, way: str, monkeypatch):
    """A slice default dropping everything, built to read the id by `way`."""
    if way == "helper":
        monkeypatch.setattr(bpfwall_build, "_socket_cgroup_id_flags", list)
    obj = build(UnitProgram(analyze("false"), analyze("false"), slice_default=True), cache=tmp_path)
    monkeypatch.undo()
    bpf_skb_cgroup_id = 79  # include/uapi/linux/bpf.h; the drop event's id is read by it either way
    assert (calls(obj, PLACEHOLDER), calls(obj, bpf_skb_cgroup_id)) == ((1, 1) if way == "loads" else (0, 2))
    return obj


def test_the_offsets_are_the_kernels_own(tmp_path):
    """Our BTF scan against clang's reading of the kernel's types (bpftool's C dump): the build
    fails unless every offset is the one clang computes."""
    offsets = vmlinux.socket_cgroup_id_offsets()
    assert offsets is not None, "this kernel has BTF and bpf_cast_to_kern_ctx: the fast way must be found"
    header = tmp_path / "vmlinux.h"
    with open(header, "w") as f:
        subprocess.run(["bpftool", "btf", "dump", "file", vmlinux.VMLINUX, "format", "c"], stdout=f, check=True)
    asserts = "".join(
        f"_Static_assert(__builtin_offsetof(struct {struct_name}, {path}) == {offsets[name]}, \"{name}\");\n"
        for name, (struct_name, path) in vmlinux.SOCKET_CGROUP_ID_PATH.items())
    (tmp_path / "check.c").write_text(f'#include "vmlinux.h"\n{asserts}')
    proc = subprocess.run(["clang", "-target", "bpf", "-fsyntax-only", str(tmp_path / "check.c")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dump = subprocess.run(["bpftool", "btf", "dump", "file", vmlinux.VMLINUX], capture_output=True, text=True,
                          check=True).stdout
    line = next(line for line in dump.splitlines() if "FUNC 'bpf_cast_to_kern_ctx'" in line)
    assert vmlinux.running_kernel().func_id("bpf_cast_to_kern_ctx") == int(line.split("]")[0].lstrip("["))


@pytest.mark.traffic
@pytest.mark.parametrize("way", ["loads", "helper"])
def test_both_ways_see_the_packets_cgroup_on_real_traffic(tmp_path, monkeypatch, way):
    """A deny-all default on a slice; x.service below it. Judged below: UDP and TCP pass both
    ways; judged by the default: nothing does; a sub-cgroup of x.service takes x's class."""
    obj = guard_object(tmp_path, way, monkeypatch)
    with ExitStack() as stack:
        loaded = stack.enter_context(loader.load(obj))
        sl = stack.enter_context(TempCgroup("bpfwall-test", suffix=".slice"))
        x = stack.enter_context(TempCgroup(name="x.service", parent=sl.path))
        worker = stack.enter_context(TempCgroup(name="worker", parent=x.path))
        for direction in ("ingress", "egress"):
            link = cgroup.link(sl.path, loaded.progs[f"cgroup_skb/{direction}"], direction)
            stack.callback(os.close, link)
        guard = GuardMap(os.dup(loaded.maps[pc.GUARD]), os.dup(loaded.maps[pc.GUARD_MORE]))
        stack.callback(guard.close)
        outside = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        outside.bind(("127.0.0.1", 0))

        def traffic(cg) -> tuple[int, int, bool]:
            """(datagrams out of cg that arrive, datagrams into cg that arrive, a TCP connection to
            a listener in cg is accepted)"""
            with cg.entered():
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with udp, listener:
                udp.bind(("127.0.0.1", 0))
                for _ in range(3):
                    try:
                        udp.sendto(b"x", outside.getsockname())
                    except PermissionError:
                        pass
                    outside.sendto(b"y", udp.getsockname())
                out, into = receive_all(outside, 0.2), receive_all(udp, 0.2)
                listener.bind(("127.0.0.1", 0))
                listener.listen()
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
                    client.settimeout(0.5)
                    try:
                        client.connect(listener.getsockname())
                        connected = True
                    except OSError:
                        connected = False
            return out, into, connected

        cgid = cgroup.cgroup_id(x.path)
        guard.classify(cgid, ["ingress", "egress"])
        assert traffic(x) == (3, 3, True)
        assert traffic(worker) == (3, 3, True)  # unclassified: its parent's class
        guard.classify(cgid, [])
        assert traffic(x) == (0, 0, False)
        assert traffic(worker) == (0, 0, False)
        guard.classify(cgid, ["egress"])
        assert traffic(x)[:2] == (3, 0)
        assert guard.forget(cgid)


def test_a_kernel_without_the_kfunc_is_one_clear_error(tmp_path, monkeypatch):
    """An object built for a kernel with bpf_cast_to_kern_ctx, loaded where there is none: the
    loader says so before the verifier sees it, and nothing is left loaded."""
    obj = guard_object(tmp_path, "loads", monkeypatch)
    monkeypatch.setattr(loader, "running_kernel", lambda: None)
    with pytest.raises(KernelError, match="calls kfunc bpf_cast_to_kern_ctx, which this kernel does not have"):
        loader.load(obj)
