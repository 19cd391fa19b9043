"""inotify(7) through ctypes: a non-blocking fd for a poll loop, and its events.

cgroupfs reports mkdir/rmdir like any filesystem: IN_CREATE (with IN_ISDIR) in
the parent, IN_DELETE_SELF then IN_IGNORED on the removed directory. A watch
covers one directory, not its subtree, so the watcher adds one per cgroup.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len; then name[len]
_READ_SIZE = 256 * 1024


class InotifyError(OSError):
    """inotify refused; the message says what to do (e.g. raise fs.inotify.max_user_watches)."""


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    cookie: int
    name: str  # the entry inside the watched directory ("" for events on the directory itself)


def _libc():
    # The C library this process already has (as kernel/syscall.py): find_library would run
    # ldconfig (a subprocess) at import.
    lib = ctypes.CDLL(None, use_errno=True)
    lib.inotify_init1.argtypes = [ctypes.c_int]
    lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


_lib = _libc()


def parse_events(buf: bytes) -> list[Event]:
    """The events in one read(2) of an inotify fd (the kernel never splits an event)."""
    events, off = [], 0
    while off + _HEADER.size <= len(buf):
        wd, mask, cookie, length = _HEADER.unpack_from(buf, off)
        off += _HEADER.size
        raw = buf[off:off + length]
        off += length
        events.append(Event(wd, mask, cookie, os.fsdecode(raw.split(b"\0", 1)[0])))
    return events


class Inotify:
    """One inotify instance: add/remove watches, read pending events without blocking."""

    def __init__(self):
        fd = _lib.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            hint = " (raise fs.inotify.max_user_instances)" if err == errno.EMFILE else ""
            raise InotifyError(err, f"inotify_init1: {os.strerror(err)}{hint}")
        self.fd = fd

    def add(self, path: str, mask: int) -> int | None:
        """Watch `path`; its watch descriptor (the same one again for a directory already
        watched), or None when the directory vanished meanwhile."""
        wd = _lib.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd >= 0:
            return wd
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return None
        if err == errno.ENOSPC:
            raise InotifyError(err, f"cannot watch {path}: the inotify watch limit is reached "
                                    "(raise it with: sysctl fs.inotify.max_user_watches=N)")
        raise InotifyError(err, f"cannot watch {path}: {os.strerror(err)}")

    def remove(self, wd: int) -> None:
        _lib.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel removed it already: fine

    def read(self) -> list[Event]:
        """All events pending now; [] when there are none."""
        events: list[Event] = []
        while True:
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return events
            events.extend(parse_events(buf))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
