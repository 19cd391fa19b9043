"""BPF maps: create, read, write, iterate, describe; `Map`, an open map with its info.

A per-CPU map (PERCPU_ARRAY) holds one value per possible CPU. A lookup
returns, and an update takes, all of them at once: possible_cpus() slots of
round_up(value_size, 8) bytes each, CPU 0 first; see percpu_value_size().
Map.lookup_percpu / update_percpu split and join those slots.
"""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Iterator

from . import syscall as sc
from .errors import KernelError
from .fd import Fd, Object
from .progs import map_get_fd_by_id  # progs keeps the id commands of both kinds

PERCPU_TYPES = frozenset({sc.BPF_MAP_TYPE_PERCPU_ARRAY})


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


def percpu_stride(value_size: int) -> int:
    """Bytes of one CPU's value in a per-CPU map's buffer: the value padded to 8 bytes."""
    return (value_size + 7) // 8 * 8


def percpu_value_size(value_size: int) -> int:
    """Bytes of a per-CPU map's value buffer: one padded value per possible CPU."""
    return percpu_stride(value_size) * sc.possible_cpus()


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


class Map(Object):
    """An open map. Its info (type, sizes, name, id: fixed for a map's life) is read once.

    Owns its fd when given an Fd; given an int, it borrows it (the caller closes it).
    Keys and values are bytes; a per-CPU map's lookup()/update() take the whole buffer,
    lookup_percpu()/update_percpu() one value per possible CPU.
    """

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0,
               name: str = "", **btf) -> "Map":
        return cls(Fd(map_create(map_type, key_size, value_size, max_entries, flags, name, **btf)))

    @classmethod
    def from_id(cls, map_id: int) -> "Map":
        """Open map `map_id` (needs CAP_SYS_ADMIN)."""
        return cls(Fd(map_get_fd_by_id(map_id)))

    def _read_info(self) -> MapInfo:
        return map_info(self.fileno())

    @property
    def percpu(self) -> bool:
        return self.info.type in PERCPU_TYPES

    @property
    def value_buffer_size(self) -> int:
        """Bytes lookup() returns and update() takes."""
        size = self.info.value_size
        return percpu_value_size(size) if self.percpu else size

    def lookup(self, key: bytes) -> bytes | None:
        return map_lookup(self.fileno(), key, self.value_buffer_size)

    def update(self, key: bytes, value: bytes, flags: int = sc.BPF_ANY) -> None:
        map_update(self.fileno(), key, value, flags)

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False when it was not there."""
        return map_delete(self.fileno(), key)

    def keys(self) -> Iterator[bytes]:
        return map_keys(self.fileno(), self.info.key_size)

    __iter__ = keys

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs; a key deleted between iteration and lookup is skipped."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """A per-CPU map's value at `key`: one value_size bytes per possible CPU, CPU 0 first."""
        raw = self.lookup(key)
        if raw is None:
            return None
        size, stride = self.info.value_size, self._stride()
        return [raw[off:off + size] for off in range(0, len(raw), stride)]

    def update_percpu(self, key: bytes, values: list[bytes], flags: int = sc.BPF_ANY) -> None:
        """Set each CPU's value (one per possible CPU, each value_size bytes)."""
        size, stride = self.info.value_size, self._stride()
        if len(values) != sc.possible_cpus() or any(len(v) != size for v in values):
            raise ValueError(f"map {self.info.name!r}: {sc.possible_cpus()} values of {size} bytes expected")
        self.update(key, b"".join(v.ljust(stride, b"\0") for v in values), flags)

    def _stride(self) -> int:
        if not self.percpu:
            raise ValueError(f"map {self.info.name!r} is not a per-CPU map")
        return percpu_stride(self.info.value_size)
