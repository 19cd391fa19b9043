"""Pins: BPF objects kept alive by name on a BPF filesystem (bpffs), reached safely.

bpffs refuses (EPERM) every file or directory name that contains a '.'
(kernel/bpf/inode.c reserves them), so names are checked here first and the
error says so instead of "Operation not permitted".

Everything that decides what gets attached is read from pins, and the kernel
mounts bpffs with mode 1777: any local user may create directories there, and
symlinks. So a pin directory is reached through a chain of directory fds, each
opened with O_NOFOLLOW relative to the last and checked with fstat (owned by
root or us; not writable by group or others — a sticky world-writable directory
like a 1777 bpffs root is accepted only *above* the directory we trust, where
others may create entries but not replace ours). Pins are then made, opened
and removed relative to the checked directory's fd (BPF_F_PATH_FD, *at()
calls): nothing is looked up by path twice, so nothing can be swapped between
our check and the kernel's use.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat

from . import syscall as sc
from .errors import KernelError, NotBpffs
from .maps import map_info
from .progs import prog_info

MOUNT_HINT = "mount it with: mount -t bpf -o mode=0700 bpf /sys/fs/bpf"
DIR_MODE = 0o700


class UnsafePin(KernelError):
    """A pin directory or pin that someone other than root could have planted or changed."""


def _check_name(name: str, where: str) -> None:
    if "." in name:
        raise KernelError(errno.EINVAL, f"cannot pin at {where}: bpffs refuses names containing '.'")
    if not name or "/" in name or name in (".", ".."):
        raise KernelError(errno.EINVAL, f"not a pin name: {name!r} in {where}")


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _unsafe(path: str, st: os.stat_result, strict: bool) -> str | None:
    """Why the directory or pin at `path` (already fstat'ed) cannot be trusted, or None."""
    if not _trusted_owner(st):
        return (f"{path} is owned by uid {st.st_uid}, not root: someone else created it; remove it "
                f"(rm -r {path}) and keep bpffs private ({MOUNT_HINT})")
    writable = st.st_mode & 0o022
    if writable and (strict or not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)):
        return (f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}): others could "
                f"replace what is pinned there; fix it with: chmod go-w {path}")
    return None


def _open_dir_at(parent: int, name: str, path: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePin(errno.ELOOP, f"refusing {path}: it is a symbolic link; bpfwall follows no "
                                         "links in its pin tree (remove it)") from None
        if e.errno == errno.ENOTDIR:
            raise KernelError(e.errno, f"{path} is not a directory") from None
        raise


class PinDir:
    """An open, checked directory on bpffs; pins are made and opened relative to it."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(cls, path: str, create: bool = False, trusted_from: str | None = None) -> "PinDir":
        """Open the bpffs directory `path` through checked fds, creating what is missing if asked.

        Directories from `trusted_from` (default: `path` itself) down must be ours and not
        writable by others; those above it may also be sticky world-writable (a 1777 bpffs root).
        """
        path = os.path.abspath(path)
        strict_from = os.path.abspath(trusted_from) if trusted_from else path
        parts = [p for p in path.split("/") if p]
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        here = "/"
        try:
            for name in parts:
                here = os.path.join(here, name)
                try:
                    child = _open_dir_at(fd, name, here)
                except FileNotFoundError:
                    if not create:
                        raise KernelError(errno.ENOENT, f"{here} does not exist") from None
                    if sc.fs_magic_fd(fd) != sc.BPF_FS_MAGIC:
                        raise NotBpffs(errno.ENOTSUP, f"{os.path.dirname(here)} is not on a BPF filesystem "
                                                      f"(bpffs); {MOUNT_HINT}") from None
                    _check_name(name, here)
                    try:
                        os.mkdir(name, DIR_MODE, dir_fd=fd)
                    except FileExistsError:
                        pass  # made meanwhile: it is checked below like any other
                    except OSError as e:
                        raise KernelError(e.errno, f"cannot create {here}: {e.strerror}") from None
                    child = _open_dir_at(fd, name, here)
                except OSError as e:
                    if e.errno == errno.EPERM:
                        _check_name(name, here)  # bpffs answers EPERM for names with a dot
                    raise KernelError(e.errno, f"cannot open {here}: {e.strerror}") from None
                os.close(fd)
                fd = child
                strict = here == strict_from or here.startswith(strict_from + "/")
                if (why := _unsafe(here, os.fstat(fd), strict)) is not None:
                    raise UnsafePin(errno.EPERM, f"refusing pin directory {why}")
            if sc.fs_magic_fd(fd) != sc.BPF_FS_MAGIC:
                raise NotBpffs(errno.ENOTSUP, f"{path} is not on a BPF filesystem (bpffs); {MOUNT_HINT}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def sub(self, name: str, create: bool = False) -> "PinDir":
        """The checked subdirectory `name` (always strict: it lies inside a trusted directory)."""
        full = os.path.join(self.path, name)
        _check_name(name, full)
        try:
            fd = _open_dir_at(self.fd, name, full)
        except FileNotFoundError:
            if not create:
                raise KernelError(errno.ENOENT, f"{full} does not exist") from None
            try:
                os.mkdir(name, DIR_MODE, dir_fd=self.fd)
            except FileExistsError:
                pass
            except OSError as e:
                raise KernelError(e.errno, f"cannot create {full}: {e.strerror}") from None
            fd = _open_dir_at(self.fd, name, full)
        if (why := _unsafe(full, os.fstat(fd), True)) is not None:
            os.close(fd)
            raise UnsafePin(errno.EPERM, f"refusing pin directory {why}")
        return PinDir(fd, full)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PinDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- entries ------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def is_dir(self, name: str) -> bool:
        st = self.lstat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def _checked_pin(self, name: str) -> None:
        full = os.path.join(self.path, name)
        st = self.lstat(name)
        if st is None:
            raise KernelError(errno.ENOENT, f"nothing is pinned at {full}")
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePin(errno.ELOOP, f"refusing {full}: it is a symbolic link, not a pin (remove it)")
        if not stat.S_ISREG(st.st_mode):
            raise KernelError(errno.EINVAL, f"{full} is not a pin")
        if (why := _unsafe(full, st, True)) is not None:
            raise UnsafePin(errno.EPERM, f"refusing pin {why}")

    def get(self, name: str) -> int:
        """A new fd for the object pinned at `name` (checked: a pin of ours, no link)."""
        self._checked_pin(name)
        buf = ctypes.create_string_buffer(os.fsencode(name))
        attr = sc.ObjAttr(pathname=sc.addr(buf), file_flags=sc.BPF_F_PATH_FD, path_fd=self.fd)
        try:
            return sc.bpf(sc.BPF_OBJ_GET, attr)
        except KernelError as e:
            full = os.path.join(self.path, name)
            if e.errno == errno.ENOENT:
                raise KernelError(e.errno, f"nothing is pinned at {full}") from None
            raise e.within(f"cannot open the pin {full}") from None

    def pin(self, fd: int, name: str) -> None:
        """Pin the program, map or link `fd` at `name` (which must not exist)."""
        full = os.path.join(self.path, name)
        _check_name(name, full)
        buf = ctypes.create_string_buffer(os.fsencode(name))
        attr = sc.ObjAttr(pathname=sc.addr(buf), bpf_fd=fd, file_flags=sc.BPF_F_PATH_FD, path_fd=self.fd)
        try:
            sc.bpf(sc.BPF_OBJ_PIN, attr)
        except KernelError as e:
            raise e.within(f"cannot pin {_describe(fd)} at {full}") from None

    def replace(self, fd: int, name: str) -> None:
        """Pin `fd` at `name`, atomically replacing whatever is pinned there: the new pin is
        made under an unpredictable name and renamed over the old one."""
        _check_name(name, os.path.join(self.path, name))
        tmp = f"tmp{secrets.token_hex(8)}"
        self.pin(fd, tmp)
        try:
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            self.unpin(tmp)
            raise KernelError(e.errno, f"cannot replace the pin {os.path.join(self.path, name)}: "
                                       f"{e.strerror}") from None

    def rename(self, old: str, new: str) -> None:
        try:
            os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            raise KernelError(e.errno, f"cannot rename {os.path.join(self.path, old)} to {new}: "
                                       f"{e.strerror}") from None

    def unpin(self, name: str) -> bool:
        """Remove the pin `name` (the object lives on while used); False when there was none."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise KernelError(e.errno, f"cannot unpin {os.path.join(self.path, name)}: {e.strerror}") from None
        return True

    def rmdir(self, name: str) -> bool:
        try:
            os.rmdir(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise KernelError(e.errno, f"cannot remove {os.path.join(self.path, name)}: {e.strerror}") from None
        return True


def _describe(fd: int) -> str:
    """"map 'counters'" or "program 'x'", for messages (the kind from /proc/self/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = f.read()
        if "link_type:" in info:
            return "link"
        if "prog_type:" in info:
            return f"program {prog_info(fd).name!r}"
        if "map_type:" in info:
            return f"map {map_info(fd).name!r}"
    except (OSError, KernelError):
        pass
    return f"fd {fd}"


# -- by path: each call opens the parent through checked fds ---------------------

def ensure_bpffs(path: str) -> None:
    """Make `path` a directory on bpffs, creating the missing parts (mode 0700), checked."""
    PinDir.open(path, create=True).close()


def _parent(path: str, create: bool = False) -> tuple[PinDir, str]:
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    try:
        d = PinDir.open(directory, create=create, trusted_from=path)
    except KernelError as e:
        if e.errno == errno.ENOENT and not create:
            raise KernelError(errno.ENOENT, f"nothing is pinned at {path}") from None
        raise
    return d, name


def pin(fd: int, path: str) -> None:
    """Pin the program or map `fd` at `path` (which must not exist)."""
    d, name = _parent(path)
    with d:
        d.pin(fd, name)


def get(path: str) -> int:
    """A new fd for the object pinned at `path`."""
    d, name = _parent(path)
    with d:
        return d.get(name)


def replace_pin(fd: int, path: str) -> None:
    """Pin `fd` at `path`, atomically replacing whatever is pinned there."""
    d, name = _parent(path)
    with d:
        d.replace(fd, name)


def unpin(path: str) -> bool:
    """Remove the pin at `path`; False when there was none."""
    try:
        d, name = _parent(path)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    with d:
        return d.unpin(name)
