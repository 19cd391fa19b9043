"""kernel/vmlinux.py's lookups on a BTF blob built here, shaped like the kernel's where it matters
(an anonymous union around a pointer, a member struct, bitfields, typedefs, a FUNC): no kernel, no
root. tests/kernel/test_socket_cgroup_id.py checks the same lookups against the running kernel."""
from __future__ import annotations

import struct

import pytest

from bpfwall.kernel import btf as B
from bpfwall.kernel.vmlinux import KernelBtf


class Blob:
    """A BTF blob written type by type; ids count from 1."""

    def __init__(self):
        self.types, self.strings, self.count = bytearray(), bytearray(b"\0"), 0

    def name(self, s: str) -> int:
        if not s:
            return 0
        off = len(self.strings)
        self.strings += s.encode() + b"\0"
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, tail: bytes = b"", kind_flag: int = 0) -> int:
        info = kind_flag << 31 | kind << 24 | vlen
        self.types += struct.pack("=III", self.name(name), info, size_or_type) + tail
        self.count += 1
        return self.count

    def int(self, name: str, size: int) -> int:
        return self.add(name, B.KIND_INT, 0, size, struct.pack("=I", size * 8))

    def struct(self, name: str, size: int, members, kind: int = B.KIND_STRUCT, kind_flag: int = 0) -> int:
        tail = b"".join(struct.pack("=III", self.name(m), t, off) for m, t, off in members)
        return self.add(name, kind, len(members), size, tail, kind_flag)

    def bytes(self) -> bytes:
        hdr = B._HEADER.pack(B.BTF_MAGIC, 1, 0, B._HEADER.size, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + bytes(self.types) + bytes(self.strings)


@pytest.fixture
def kernel() -> KernelBtf:
    b = Blob()
    u64 = b.int("long long unsigned int", 8)                 # 1
    u32 = b.int("unsigned int", 4)                            # 2
    typedef = b.add("u64", B.KIND_TYPEDEF, 0, u64)            # 3
    node = b.struct("kernfs_node", 104, [("count", u32, 0), ("id", typedef, 96 * 8)])  # 4
    node_ptr = b.add("", B.KIND_PTR, 0, node)                 # 5
    cgroup = b.struct("cgroup", 264, [("flags", u64, 0), ("kn", node_ptr, 256 * 8)])  # 6
    cg_ptr = b.add("", B.KIND_PTR, 0, cgroup)                 # 7
    data = b.struct("sock_cgroup_data", 16, [("cgroup", cg_ptr, 0), ("classid", u32, 64)])  # 8
    sock = b.struct("sock", 700, [("skc_family", u32, 0), ("sk_cgrp_data", data, 672 * 8)])  # 9
    sock_ptr = b.add("", B.KIND_PTR, 0, sock)                 # 10
    anon = b.struct("", 8, [("sk", sock_ptr, 0), ("ip_defrag_offset", u32, 0)], kind=B.KIND_UNION)  # 11
    # kind_flag: member offsets carry a bitfield size in their top byte; `bits` is a 3-bit field
    b.struct("sk_buff", 232, [("next", u64, 0), ("bits", u32, 3 << 24 | 64), ("", anon, 24 * 8)], kind_flag=1)  # 12
    proto = b.add("", B.KIND_FUNC_PROTO, 1, u64, struct.pack("=II", 0, u64))  # 13
    b.add("bpf_cast_to_kern_ctx", B.KIND_FUNC, 0, proto)      # 14
    b.struct("sock_cgroup", 4, [("x", u32, 0)])               # 15: a name that starts like another
    return KernelBtf(b.bytes())


def test_members_are_found_through_anonymous_unions_nested_structs_and_typedefs(kernel):
    assert kernel.member_offset("sk_buff", "sk") == 24
    assert kernel.member_offset("sock", "sk_cgrp_data.cgroup") == 672
    assert kernel.member_offset("sock", "sk_cgrp_data.classid") == 680
    assert kernel.member_offset("cgroup", "kn") == 256
    assert kernel.member_offset("kernfs_node", "id") == 96


def test_what_is_not_there_is_none(kernel):
    assert kernel.member_offset("sk_buff", "nonesuch") is None
    assert kernel.member_offset("nonesuch", "sk") is None
    assert kernel.member_offset("sock", "skc_family.x") is None  # not a struct to look into
    assert kernel.member_offset("sk_buff", "bits") is None     # a bitfield has no byte offset
    assert kernel.func_id("bpf_nonesuch") is None


def test_names_match_whole_and_by_kind(kernel):
    assert kernel.func_id("bpf_cast_to_kern_ctx") == 14
    assert kernel.find("sock_cgroup", B.KIND_STRUCT) == 15          # not a prefix of another name
    assert kernel.find("sock", B.KIND_STRUCT) == 9
    assert kernel.find("cgroup", B.KIND_STRUCT) == 6                # not the tail of "sock_cgroup_data"
    assert kernel.find("bpf_cast_to_kern_ctx", B.KIND_STRUCT) is None


def test_not_btf_is_refused():
    with pytest.raises(ValueError):
        KernelBtf(b"\0" * 24)
