"""Reading a BPF ring buffer (BPF_MAP_TYPE_RINGBUF) from user space.

The map is mmap'ed as the kernel lays it out (kernel/bpf/ringbuf.c): one writable page
holding the consumer position, then, read-only, one page holding the producer position
followed by the data area mapped twice (so a record that wraps reads as one piece).
Each record starts with an 8-byte header: u32 length with BUSY (still being written) and
DISCARD bits, u32 page offset; records are 8-byte aligned. We read up to the producer
position, skip discarded records, stop at a busy one, and publish the new consumer
position so the kernel can reuse the space. epoll on the map fd wakes us when data comes.
"""
from __future__ import annotations

import mmap
import select
import struct

from .maps import map_info

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_PAGE = mmap.PAGESIZE


class RingBuffer:
    """Consumer side of one ring buffer map (the fd stays the caller's)."""

    def __init__(self, map_fd: int):
        self.size = map_info(map_fd).max_entries  # data bytes, a power of two
        self.mask = self.size - 1
        self._cons = mmap.mmap(map_fd, _PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, _PAGE + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=_PAGE)
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)

    def _consumer(self) -> int:
        return struct.unpack_from("=Q", self._cons, 0)[0]

    def _producer(self) -> int:
        return struct.unpack_from("=Q", self._prod, 0)[0]

    def poll(self, timeout: float | None = None) -> list[bytes]:
        """The records waiting, after waiting up to `timeout` seconds (None: forever) for one."""
        records = self.drain()
        if records:
            return records
        self._epoll.poll(-1 if timeout is None else timeout)
        return self.drain()

    def drain(self) -> list[bytes]:
        out = []
        cons, prod = self._consumer(), self._producer()
        while cons < prod:
            off = _PAGE + (cons & self.mask)
            length, _ = struct.unpack_from("=II", self._prod, off)
            if length & BUSY:
                break
            if not length & DISCARD:
                out.append(bytes(self._prod[off + HEADER:off + HEADER + (length & ~(BUSY | DISCARD))]))
            cons += ((length & ~(BUSY | DISCARD)) + HEADER + 7) & ~7
            struct.pack_into("=Q", self._cons, 0, cons)  # the space is the kernel's again
        return out

    def fileno(self) -> int:
        return self._epoll.fileno()

    def close(self) -> None:
        self._epoll.close()
        self._prod.close()
        self._cons.close()

    def __enter__(self) -> "RingBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
