"""Directories and files nobody else can change under us, opened without a check-then-open race.

A path is walked from / one component at a time with O_NOFOLLOW|O_DIRECTORY,
each directory fstat-checked through the fd we then open the next component
with: a symlink, or a directory not owned by root or the euid, or one that
group or others may write (except a sticky one such as /tmp on the way, whose
entries others cannot rename), ends the walk. Whoever controls a directory on
the path can swap what lies below it, so the whole path is checked, not only
the last directory. Files are opened through the final directory's fd with
O_NOFOLLOW and fstat-checked; writes go to an unpredictable temporary name
(O_EXCL) and are renamed into place through the same fd.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UntrustedPath(Exception):
    """A path we must not trust; str() says which and why, in one line."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}")
        self.path = path


def open_dir(path: str, create: bool = False) -> int:
    """An fd on directory `path` (made 0700 where missing if `create`), every component checked.

    Raises UntrustedPath, FileNotFoundError (missing, not `create`) or another OSError.
    """
    path = os.path.abspath(path)
    fd = os.open("/", _DIR_FLAGS)
    try:
        names = [n for n in path.split("/") if n]
        _check_dir(fd, "/", last=not names)
        walked = ""
        for i, name in enumerate(names):
            walked += "/" + name
            child = _open_child(fd, name, walked, create)
            os.close(fd)
            fd = child
            _check_dir(fd, walked, last=i == len(names) - 1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_child(parent: int, name: str, path: str, create: bool) -> int:
    try:
        return _open_dir_at(parent, name, path)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile: opened and checked like any other
    return _open_dir_at(parent, name, path)


def _open_dir_at(parent: int, name: str, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        try:  # only to say which: O_DIRECTORY|O_NOFOLLOW gives ENOTDIR for both
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        raise UntrustedPath(path, "is a symbolic link" if link else "is not a directory") from None


def _check_dir(fd: int, path: str, last: bool) -> None:
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise UntrustedPath(path, f"is owned by uid {st.st_uid}, not by root{_or_euid()}")
    if st.st_mode & _WRITABLE_BY_OTHERS and (last or not st.st_mode & stat.S_ISVTX):
        raise UntrustedPath(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _or_euid() -> str:
    return f" or uid {os.geteuid()}" if os.geteuid() else ""


def read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """The bytes of regular file `name` in `dir_fd`, if it is ours and no one else may write it.

    Raises UntrustedPath, ValueError (larger than `limit`) or OSError.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UntrustedPath(name, "is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UntrustedPath(name, "is not a regular file")
        if st.st_uid != os.geteuid():
            raise UntrustedPath(name, f"is owned by uid {st.st_uid}, not {os.geteuid()}")
        if st.st_mode & _WRITABLE_BY_OTHERS:
            raise UntrustedPath(name, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"{name} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes) -> None:
    """Replace `name` in `dir_fd` atomically by a 0600 file holding `data` (fsynced)."""
    tmp = f".tmp-{secrets.token_hex(16)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
