"""bpf(2) and statfs(2) through ctypes: commands, constants and the attr layouts we use.

Each command gets its own ctypes Structure holding only the leading members of
its part of `union bpf_attr` (include/uapi/linux/bpf.h) that we set or read.
The kernel copies `size` bytes and zero-fills the rest of the union, so a
shorter struct is the same as a zeroed long one, on every kernel version.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform

from .errors import KernelError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}

# Commands (enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_NEXT_ID = 11
BPF_MAP_GET_NEXT_ID = 12
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_BTF_LOAD = 18
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_GET_NEXT_ID = 31
BPF_LINK_DETACH = 34

# OBJ_PIN/OBJ_GET: `pathname` is relative to the directory fd in `path_fd` (Linux 6.5+), so a
# pin is made or opened inside a directory we opened and checked, never through a path an
# attacker could swap between our check and the kernel's lookup.
BPF_F_PATH_FD = 1 << 14

# Link types (enum bpf_link_type) we read back.
BPF_LINK_TYPE_CGROUP = 3

# Map types (enum bpf_map_type) bpfwall uses.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_RINGBUF = 27
MAP_TYPE_NAMES = {BPF_MAP_TYPE_HASH: "HASH", BPF_MAP_TYPE_ARRAY: "ARRAY",
                  BPF_MAP_TYPE_PERCPU_ARRAY: "PERCPU_ARRAY", BPF_MAP_TYPE_LPM_TRIE: "LPM_TRIE",
                  BPF_MAP_TYPE_RINGBUF: "RINGBUF"}

# Map creation flag: elements are allocated on update, not up front (LPM tries require it).
BPF_F_NO_PREALLOC = 1 << 0

# Map update flags.
BPF_ANY = 0      # create or replace
BPF_NOEXIST = 1  # create only
BPF_EXIST = 2    # replace only
BPF_F_LOCK = 4   # a value with a bpf_spin_lock: written under its lock

# Program and attach types.
BPF_PROG_TYPE_CGROUP_SKB = 8
BPF_CGROUP_INET_INGRESS = 0
BPF_CGROUP_INET_EGRESS = 1

# Cgroup attach flags (BPF_PROG_ATTACH, reported back by BPF_PROG_QUERY).
# None set: the program is the cgroup's only one for that hook, and no
# descendant cgroup may attach any program to it.
BPF_F_ALLOW_OVERRIDE = 1 << 0  # still only one; a descendant's own program runs instead of it
BPF_F_ALLOW_MULTI = 1 << 1     # a list: several programs here, and descendants' programs run too
BPF_F_REPLACE = 1 << 2         # with ALLOW_MULTI: swap replace_bpf_fd's program in place, no gap

# ld_imm64 src_reg: imm holds a map fd, which the verifier turns into the map's address.
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_KFUNC_CALL = 2  # call: imm is a kfunc's BTF id (in vmlinux when off is 0)

FUNC_INFO_REC_SIZE = 8    # struct bpf_func_info {insn_off, type_id}
LINE_INFO_REC_SIZE = 16   # struct bpf_line_info {insn_off, file_name_off, line_off, line_col}

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8

# statfs f_type of the filesystems we check for.
BPF_FS_MAGIC = 0xCAFE4A11
CGROUP2_SUPER_MAGIC = 0x63677270

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", u32), ("key_size", u32), ("value_size", u32), ("max_entries", u32),
                ("map_flags", u32), ("inner_map_fd", u32), ("numa_node", u32),
                ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("map_ifindex", u32),
                ("btf_fd", u32), ("btf_key_type_id", u32), ("btf_value_type_id", u32)]


class MapElemAttr(ctypes.Structure):
    """MAP_{LOOKUP,UPDATE,DELETE}_ELEM and MAP_GET_NEXT_KEY (`value` is `next_key` there)."""
    _fields_ = [("map_fd", u32), ("key", u64), ("value", u64), ("flags", u64)]


class ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", u32), ("insn_cnt", u32), ("insns", u64), ("license", u64),
                ("log_level", u32), ("log_size", u32), ("log_buf", u64), ("kern_version", u32),
                ("prog_flags", u32), ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
                ("prog_ifindex", u32), ("expected_attach_type", u32), ("prog_btf_fd", u32),
                ("func_info_rec_size", u32), ("func_info", u64), ("func_info_cnt", u32),
                ("line_info_rec_size", u32), ("line_info", u64), ("line_info_cnt", u32)]


class ObjAttr(ctypes.Structure):
    """OBJ_PIN and OBJ_GET (`path_fd` with BPF_F_PATH_FD in `file_flags`)."""
    _fields_ = [("pathname", u64), ("bpf_fd", u32), ("file_flags", u32), ("path_fd", ctypes.c_int32)]


class LinkCreateAttr(ctypes.Structure):
    """LINK_CREATE for a cgroup hook: `target_fd` is the cgroup directory."""
    _fields_ = [("prog_fd", u32), ("target_fd", u32), ("attach_type", u32), ("flags", u32)]


class LinkUpdateAttr(ctypes.Structure):
    """LINK_UPDATE: with BPF_F_REPLACE, only if the link still runs `old_prog_fd`'s program."""
    _fields_ = [("link_fd", u32), ("new_prog_fd", u32), ("flags", u32), ("old_prog_fd", u32)]


class LinkDetachAttr(ctypes.Structure):
    _fields_ = [("link_fd", u32)]


class LinkInfoStruct(ctypes.Structure):
    """struct bpf_link_info with its cgroup member (the union starts 8-aligned, at 16)."""
    _fields_ = [("type", u32), ("id", u32), ("prog_id", u32), ("_pad", u32),
                ("cgroup_id", u64), ("attach_type", u32), ("_rest", u32 * 8)]


class AttachAttr(ctypes.Structure):
    """PROG_ATTACH and PROG_DETACH."""
    _fields_ = [("target_fd", u32), ("attach_bpf_fd", u32), ("attach_type", u32),
                ("attach_flags", u32), ("replace_bpf_fd", u32)]


class TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", u32), ("retval", u32), ("data_size_in", u32), ("data_size_out", u32),
                ("data_in", u64), ("data_out", u64), ("repeat", u32), ("duration", u32),
                ("ctx_size_in", u32), ("ctx_size_out", u32), ("ctx_in", u64), ("ctx_out", u64)]


# struct __sk_buff as BPF_PROG_TEST_RUN's ctx_in, up to the one field bpfwall sets: the kernel
# runs the program as if the packet arrived on device `ifindex` (> 1; else loopback).
SKB_CTX_IFINDEX_OFFSET = 40
SKB_CTX_SIZE = 44


class GetIdAttr(ctypes.Structure):
    """*_GET_NEXT_ID (start_id) and *_GET_FD_BY_ID (the same word is the id)."""
    _fields_ = [("start_id", u32), ("next_id", u32), ("open_flags", u32)]


class InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", u32), ("info_len", u32), ("info", u64)]


class QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", u32), ("attach_type", u32), ("query_flags", u32),
                ("attach_flags", u32), ("prog_ids", u64), ("prog_cnt", u32)]


class BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", u64), ("btf_log_buf", u64), ("btf_size", u32), ("btf_log_size", u32),
                ("btf_log_level", u32)]


class MapInfoStruct(ctypes.Structure):
    """struct bpf_map_info, up to btf_value_type_id."""
    _fields_ = [("type", u32), ("id", u32), ("key_size", u32), ("value_size", u32),
                ("max_entries", u32), ("map_flags", u32), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
                ("ifindex", u32), ("btf_vmlinux_value_type_id", u32), ("netns_dev", u64),
                ("netns_ino", u64), ("btf_id", u32), ("btf_key_type_id", u32),
                ("btf_value_type_id", u32)]


class ProgInfoStruct(ctypes.Structure):
    """struct bpf_prog_info, up to run_cnt."""
    _fields_ = [("type", u32), ("id", u32), ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
                ("jited_prog_len", u32), ("xlated_prog_len", u32), ("jited_prog_insns", u64),
                ("xlated_prog_insns", u64), ("load_time", u64), ("created_by_uid", u32),
                ("nr_map_ids", u32), ("map_ids", u64), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
                ("ifindex", u32), ("gpl_compatible", u32), ("netns_dev", u64), ("netns_ino", u64),
                ("nr_jited_ksyms", u32), ("nr_jited_func_lens", u32), ("jited_ksyms", u64),
                ("jited_func_lens", u64), ("btf_id", u32), ("func_info_rec_size", u32),
                ("func_info", u64), ("nr_func_info", u32), ("nr_line_info", u32), ("line_info", u64),
                ("jited_line_info", u64), ("nr_jited_line_info", u32), ("line_info_rec_size", u32),
                ("jited_line_info_rec_size", u32), ("nr_prog_tags", u32), ("prog_tags", u64),
                ("run_time_ns", u64), ("run_cnt", u64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]


def _sys_bpf() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise KernelError(errno.ENOSYS, f"bpf(2): syscall number unknown for machine {machine!r}")
    return _SYS_BPF[machine]


def bpf(cmd: int, attr: ctypes.Structure, what: str | None = None) -> int:
    """Issue bpf(cmd, &attr); the result, or KernelError("<what>: <strerror>")."""
    ret = _libc.syscall(ctypes.c_long(_sys_bpf()), ctypes.c_int(cmd), ctypes.byref(attr),
                        ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        message = f"{what}: {os.strerror(err)}" if what else os.strerror(err)
        if err == errno.EPERM and os.geteuid() != 0:
            message += " (bpf() needs root, or CAP_BPF with CAP_NET_ADMIN)"
        raise KernelError(err, message)
    return ret


def addr(buf) -> int:
    """The address of a ctypes object, for the u64 pointer members of an attr."""
    return ctypes.addressof(buf) if buf is not None else 0


def buffer(data: bytes):
    """A ctypes copy of `data`: Python's bytes are immutable, the kernel may write."""
    return ctypes.create_string_buffer(data, len(data))


def fs_magic(path: str) -> int:
    """statfs(path).f_type; OSError when the path does not exist."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def fs_magic_fd(fd: int) -> int:
    """fstatfs(fd).f_type."""
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


@functools.cache
def possible_cpus() -> int:
    """How many CPUs the kernel keeps per-CPU map values for (/sys/devices/system/cpu/possible)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count
