"""Pins: BPF objects kept alive by name on a BPF filesystem (bpffs).

bpffs refuses (EPERM) every file or directory name that contains a '.'
(kernel/bpf/inode.c reserves them), so names are checked here first and the
error says so instead of "Operation not permitted".
"""
from __future__ import annotations

import ctypes
import errno
import os
import uuid

from . import syscall as sc
from .errors import KernelError, NotBpffs
from .maps import map_info
from .progs import prog_info

MOUNT_HINT = "mount it with: mount -t bpf bpf /sys/fs/bpf"


def _check_name(path: str) -> None:
    if "." in os.path.basename(path):
        raise KernelError(errno.EINVAL, f"cannot pin at {path}: bpffs refuses names containing '.'")


def _is_bpffs(path: str) -> bool:
    return sc.fs_magic(path) == sc.BPF_FS_MAGIC


def ensure_bpffs(path: str) -> None:
    """Make `path` a directory on bpffs, creating the missing parts."""
    path = os.path.abspath(path)
    existing, missing = path, []
    while not os.path.isdir(existing):
        if os.path.lexists(existing):
            raise KernelError(errno.ENOTDIR, f"cannot create {path}: {existing} is not a directory")
        existing, name = os.path.split(existing)
        missing.append(name)
    if not _is_bpffs(existing):
        raise NotBpffs(errno.ENOTSUP, f"{existing} is not on a BPF filesystem (bpffs); {MOUNT_HINT}")
    for name in reversed(missing):
        existing = os.path.join(existing, name)
        _check_name(existing)
        try:
            os.mkdir(existing)
        except FileExistsError:
            pass  # made meanwhile by someone else: fine
        except OSError as e:
            raise KernelError(e.errno, f"cannot create {existing}: {e.strerror}") from None


def _describe(fd: int) -> str:
    """"map 'counters'" or "program 'x'", for messages (the kind from /proc/self/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = f.read()
        if "prog_type:" in info:
            return f"program {prog_info(fd).name!r}"
        if "map_type:" in info:
            return f"map {map_info(fd).name!r}"
    except (OSError, KernelError):
        pass
    return f"fd {fd}"


def pin(fd: int, path: str) -> None:
    """Pin the program or map `fd` at `path` (which must not exist)."""
    _check_name(path)
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        sc.bpf(sc.BPF_OBJ_PIN, sc.ObjAttr(pathname=sc.addr(name), bpf_fd=fd))
    except KernelError as e:
        if e.errno in (errno.EPERM, errno.EINVAL) and os.path.isdir(os.path.dirname(path)) \
                and not _is_bpffs(os.path.dirname(path)):
            raise NotBpffs(e.errno, f"cannot pin {_describe(fd)} at {path}: not on a BPF filesystem; "
                                    f"{MOUNT_HINT}") from None
        raise e.within(f"cannot pin {_describe(fd)} at {path}") from None


def get(path: str) -> int:
    """A new fd for the object pinned at `path`."""
    name = ctypes.create_string_buffer(os.fsencode(path))
    try:
        return sc.bpf(sc.BPF_OBJ_GET, sc.ObjAttr(pathname=sc.addr(name)))
    except KernelError as e:
        if e.errno == errno.ENOENT:
            raise KernelError(e.errno, f"nothing is pinned at {path}") from None
        raise e.within(f"cannot open the pin {path}") from None


def replace_pin(fd: int, path: str) -> None:
    """Pin `fd` at `path`, atomically replacing whatever is pinned there.

    The new pin is made under a temporary name in the same directory and renamed
    over the old one: at every moment `path` holds either the old object or the new.
    """
    _check_name(path)
    tmp = os.path.join(os.path.dirname(path), f"tmp{uuid.uuid4().hex}")
    pin(fd, tmp)
    try:
        os.rename(tmp, path)
    except OSError as e:
        unpin(tmp)
        raise KernelError(e.errno, f"cannot replace the pin {path}: {e.strerror}") from None


def unpin(path: str) -> bool:
    """Remove the pin at `path` (the object lives on while used); False when there was none."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise KernelError(e.errno, f"cannot unpin {path}: {e.strerror}") from None
    return True


def is_pinned(path: str) -> bool:
    return os.path.lexists(path)
