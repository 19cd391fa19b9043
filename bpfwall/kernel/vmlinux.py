"""What bpfwall reads from the running kernel's own BTF (/sys/kernel/btf/vmlinux): the BTF id of
a kfunc, and the byte offset of a struct member, so that a program can read a kernel field with
one load instead of calling a helper.

Why: on CPUs whose every `ret` goes through a mitigation thunk (SRSO "Safe RET" here), a helper
call costs more than the loads it wraps: `bpf_skb_cgroup_id()` ~7 ns a packet, the same id read
through `bpf_cast_to_kern_ctx()` (a kfunc the verifier turns into a register move) and four
loads ~3 ns (bench/slice_guard.py).

The file is 5 MB of ~150,000 records; parsing it the way btf.parse does takes seconds, so this
scans the records once for the few names asked about and reads only those types in full.
"""
from __future__ import annotations

import functools
import os
import struct

from . import btf as B

VMLINUX = "/sys/kernel/btf/vmlinux"

# A program calls a kfunc through a placeholder helper number (as helpers are called: a constant
# cast to a function pointer); the loader replaces each such call by a call of the kfunc's BTF id
# (BPF_PSEUDO_KFUNC_CALL). Numbers far above any helper the kernel has.
KFUNC_PLACEHOLDERS = {0x0BF0_0001: "bpf_cast_to_kern_ctx"}


class KernelBtf:
    """The types of the running kernel, looked up by name."""

    def __init__(self, blob: bytes):
        header = B._HEADER.unpack_from(blob)
        magic, version, _, hdr_len, type_off, type_len, str_off, str_len = header
        if magic != B.BTF_MAGIC or version != 1:
            raise ValueError("not native-endian BTF v1")
        self._types = memoryview(blob)[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strings = bytes(blob[hdr_len + str_off:hdr_len + str_off + str_len])
        self._offsets: list[int] | None = None  # record offset of each type id, on first need
        self._found: dict[tuple[str, int], int | None] = {}  # find()'s answers: each is a scan of every type

    def _index(self) -> list[int]:
        if self._offsets is None:
            offsets, pos, types, end = [0], 0, self._types, len(self._types)
            trailer, unpack = B._TRAILER, struct.Struct("=I").unpack_from
            while pos < end:
                offsets.append(pos)
                info = unpack(types, pos + 4)[0]
                fixed, per_item = trailer[(info >> 24) & 0x1F]
                pos += 12 + fixed + per_item * (info & 0xFFFF)
            self._offsets = offsets
        return self._offsets

    def _name_offsets(self, name: str) -> set[int]:
        """Every string-section offset at which `name` is stored whole."""
        needle, found, start = name.encode() + b"\0", set(), 0
        while (i := self._strings.find(needle, start)) != -1:
            if i == 0 or self._strings[i - 1] == 0:
                found.add(i)
            start = i + 1
        return found

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """name_off, kind, vlen, kind_flag, size|type of a type id."""
        pos = self._index()[type_id]
        name_off, info, size_or_type = B._TYPE.unpack_from(self._types, pos)
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    def find(self, name: str, kind: int) -> int | None:
        """The id of the first type of `kind` named `name`."""
        if (name, kind) not in self._found:
            self._found[name, kind] = self._scan(name, kind)
        return self._found[name, kind]

    def _scan(self, name: str, kind: int) -> int | None:
        wanted = self._name_offsets(name)
        if not wanted:
            return None
        for type_id in range(1, len(self._index())):
            name_off, k, *_ = self._record(type_id)
            if k == kind and name_off in wanted:
                return type_id
        return None

    def _resolve(self, type_id: int) -> int:
        while True:
            _, kind, _, _, ref = self._record(type_id)
            if kind not in B._MODIFIERS:
                return type_id
            type_id = ref

    def _members(self, type_id: int):
        """(name, type id, byte offset) of a struct's or union's members; bitfields left out."""
        pos = self._index()[type_id] + 12
        _, _, vlen, kind_flag, _ = self._record(type_id)
        for i in range(vlen):
            name_off, m_type, m_off = struct.unpack_from("=III", self._types, pos + 12 * i)
            bit_off = m_off & 0xFFFFFF if kind_flag else m_off
            if kind_flag and m_off >> 24 or bit_off % 8:
                continue
            end = self._strings.index(b"\0", name_off)
            yield self._strings[name_off:end].decode(), m_type, bit_off // 8

    def _member(self, type_id: int, name: str) -> tuple[int, int] | None:
        """(type id, byte offset) of member `name`, looking into anonymous structs and unions."""
        for m_name, m_type, off in self._members(type_id):
            if m_name == name:
                return m_type, off
            if not m_name:
                inner = self._resolve(m_type)
                if self._record(inner)[1] in (B.KIND_STRUCT, B.KIND_UNION):
                    found = self._member(inner, name)
                    if found:
                        return found[0], off + found[1]
        return None

    def member_offset(self, struct_name: str, path: str) -> int | None:
        """The byte offset of `path` ("a.b": member b of member a) in struct `struct_name`."""
        type_id = self.find(struct_name, B.KIND_STRUCT)
        offset = 0
        for name in path.split("."):
            if type_id is None or self._record(type_id)[1] not in (B.KIND_STRUCT, B.KIND_UNION):
                return None
            found = self._member(type_id, name)
            if found is None:
                return None
            type_id, offset = self._resolve(found[0]), offset + found[1]
        return offset

    def func_id(self, name: str) -> int | None:
        return self.find(name, B.KIND_FUNC)


@functools.lru_cache(maxsize=1)
def running_kernel() -> KernelBtf | None:
    """The running kernel's BTF, or None when it has none (CONFIG_DEBUG_INFO_BTF off)."""
    try:
        fd = os.open(VMLINUX, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return KernelBtf(f.read())
    except (OSError, ValueError, struct.error):
        return None


# Where the socket's cgroup id is, from an sk_buff: skb->sk->sk_cgrp_data.cgroup->kn->id
# (what bpf_skb_cgroup_id() reads), by the names port_filter.c gives the offsets.
SOCKET_CGROUP_ID_PATH = {
    "SKB_SK": ("sk_buff", "sk"),
    "SOCK_CGROUP": ("sock", "sk_cgrp_data.cgroup"),
    "CGROUP_KN": ("cgroup", "kn"),
    "KERNFS_NODE_ID": ("kernfs_node", "id"),
}


def kfunc_placeholder(name: str) -> int:
    return next(number for number, kfunc in KFUNC_PLACEHOLDERS.items() if kfunc == name)


@functools.lru_cache(maxsize=1)
def socket_cgroup_id_offsets() -> dict[str, int] | None:
    """The offsets of SOCKET_CGROUP_ID_PATH in the running kernel, or None when a program cannot
    read the id that way here (no kernel BTF, no bpf_cast_to_kern_ctx, a field renamed): then
    programs call bpf_skb_cgroup_id() as before."""
    kernel = running_kernel()
    if kernel is None or kernel.func_id("bpf_cast_to_kern_ctx") is None:
        return None
    offsets = {name: kernel.member_offset(*where) for name, where in SOCKET_CGROUP_ID_PATH.items()}
    return None if None in offsets.values() else offsets
