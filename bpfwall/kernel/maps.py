"""BPF maps: create, read, write, iterate, describe.

A per-CPU map (PERCPU_ARRAY) holds one value per possible CPU. A lookup
returns, and an update takes, all of them at once: possible_cpus() slots of
round_up(value_size, 8) bytes each, CPU 0 first; see percpu_value_size().
"""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Iterator

from . import syscall as sc
from .errors import KernelError


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str
    btf_id: int


def percpu_value_size(value_size: int) -> int:
    """Bytes of a per-CPU map's value buffer: each CPU's value padded to 8 bytes."""
    return (value_size + 7) // 8 * 8 * sc.possible_cpus()


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "", btf_fd: int = 0, btf_key_type_id: int = 0,
               btf_value_type_id: int = 0) -> int:
    """A new map's fd. `name` is cut to the kernel's 15 characters."""
    attr = sc.MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                            max_entries=max_entries, map_flags=flags,
                            map_name=name.encode()[:sc.BPF_OBJ_NAME_LEN - 1], btf_fd=btf_fd,
                            btf_key_type_id=btf_key_type_id, btf_value_type_id=btf_value_type_id)
    kind = sc.MAP_TYPE_NAMES.get(map_type, f"type {map_type}")
    return sc.bpf(sc.BPF_MAP_CREATE, attr, f"cannot create map {name!r} ({kind})")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at `key`, or None. For per-CPU maps pass percpu_value_size(value_size)."""
    k, v = sc.buffer(key), ctypes.create_string_buffer(value_size)
    attr = sc.MapElemAttr(map_fd=fd, key=sc.addr(k), value=sc.addr(v))
    try:
        sc.bpf(sc.BPF_MAP_LOOKUP_ELEM, attr, f"cannot look up key {key.hex()} in map fd {fd}")
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = sc.BPF_ANY) -> None:
    k, v = sc.buffer(key), sc.buffer(value)
    attr = sc.MapElemAttr(map_fd=fd, key=sc.addr(k), value=sc.addr(v), flags=flags)
    sc.bpf(sc.BPF_MAP_UPDATE_ELEM, attr, f"cannot update key {key.hex()} in map fd {fd}")


def map_delete(fd: int, key: bytes) -> bool:
    """Remove `key`; False when it was not there."""
    k = sc.buffer(key)
    try:
        sc.bpf(sc.BPF_MAP_DELETE_ELEM, sc.MapElemAttr(map_fd=fd, key=sc.addr(k)),
               f"cannot delete key {key.hex()} from map fd {fd}")
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, in the map's order. A hash map changed meanwhile may restart or skip keys."""
    key = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        # A NULL key asks for the first one.
        attr = sc.MapElemAttr(map_fd=fd, key=sc.addr(key), value=sc.addr(nxt))
        try:
            sc.bpf(sc.BPF_MAP_GET_NEXT_KEY, attr, f"cannot iterate map fd {fd}")
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        key = sc.buffer(nxt.raw)


def map_info(fd: int) -> MapInfo:
    info = sc.MapInfoStruct()
    attr = sc.InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=sc.addr(info))
    sc.bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, f"cannot get info of map fd {fd}")
    return MapInfo(info.id, info.type, info.key_size, info.value_size, info.max_entries,
                   info.map_flags, info.name.decode(), info.btf_id)
