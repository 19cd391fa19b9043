"""Pins: BPF objects kept alive by name on a BPF filesystem (bpffs), reached safely.

bpffs refuses (EPERM) every file or directory name that contains a '.'
(kernel/bpf/inode.c reserves them), so names are checked here first and the
error says so instead of "Operation not permitted".

Everything that decides what gets attached is read from pins, and the kernel
mounts bpffs with mode 1777: any local user may create directories there, and
symlinks. So a pin directory is reached through checked directory fds
(safefs.py: owned by root or us; not writable by group or others — a sticky
world-writable directory like a 1777 bpffs root is accepted only *above* the
directory we trust, where others may create entries but not replace ours; no
symlink followed). Pins are then made, opened and removed relative to the
checked directory's fd (BPF_F_PATH_FD, *at() calls): nothing is looked up by
path twice, so nothing can be swapped between our check and the kernel's use.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat

from . import safefs
from . import syscall as sc
from .errors import KernelError, NotBpffs
from .maps import map_info
from .progs import prog_info

MOUNT_HINT = "mount it with: mount -t bpf -o mode=0700 bpf /sys/fs/bpf"


class UnsafePin(KernelError):
    """A pin directory or pin that someone other than root could have planted or changed."""


def _check_name(name: str, where: str) -> None:
    if "." in name:
        raise KernelError(errno.EINVAL, f"cannot pin at {where}: bpffs refuses names containing '.'")
    if not name or "/" in name or name in (".", ".."):
        raise KernelError(errno.EINVAL, f"not a pin name: {name!r} in {where}")


def _before_mkdir(parent_fd: int, name: str, path: str) -> None:
    """Directories are made on bpffs only, under names bpffs takes."""
    if sc.fs_magic_fd(parent_fd) != sc.BPF_FS_MAGIC:
        raise NotBpffs(errno.ENOTSUP, f"{os.path.dirname(path)} is not on a BPF filesystem (bpffs); {MOUNT_HINT}")
    _check_name(name, path)


def _kernel_error(e: safefs.PathError) -> KernelError:
    """A safefs error as the kernel layer raises it: UnsafePin for a refusal, else KernelError."""
    if e.errno == errno.EPERM and not isinstance(e, safefs.UnsafePath):
        _check_name(os.path.basename(e.path), e.path)  # bpffs answers EPERM for names with a dot
    return (UnsafePin if isinstance(e, safefs.UnsafePath) else KernelError)(e.errno, str(e))


RULES = safefs.Rules(what="the pin directory", file_what="the pin",
                     elsewhere="keep pins below directories only root can change",
                     prevent="keep bpffs private: mount -t bpf -o mode=0700 bpf /sys/fs/bpf",
                     before_mkdir=_before_mkdir)


class PinDir(safefs.CheckedDir):
    """An open, checked directory on bpffs; pins are made and opened relative to it."""

    def __init__(self, fd: int, path: str, rules: safefs.Rules = RULES, error=_kernel_error):
        super().__init__(fd, path, rules, error)

    @classmethod
    def open(cls, path: str, create: bool = False, trusted_from: str | None = None) -> "PinDir":
        """Open the bpffs directory `path` through checked fds, creating what is missing if asked.

        Directories from `trusted_from` (default: `path` itself) down must be ours and not
        writable by others; those above it may also be sticky world-writable (a 1777 bpffs root).
        """
        path = os.path.abspath(path)
        d = super().open(path, RULES, create=create, trusted_from=trusted_from, error=_kernel_error)
        try:
            if sc.fs_magic_fd(d.fd) != sc.BPF_FS_MAGIC:
                raise NotBpffs(errno.ENOTSUP, f"{path} is not on a BPF filesystem (bpffs); {MOUNT_HINT}")
        except BaseException:
            d.close()
            raise
        return d

    def sub(self, name: str, create: bool = False) -> "PinDir":
        """The checked subdirectory `name` (always strict: it lies inside a trusted directory)."""
        _check_name(name, os.path.join(self.path, name))
        return super().sub(name, create)

    # -- entries ------------------------------------------------------------

    def _checked_pin(self, name: str) -> None:
        full = os.path.join(self.path, name)
        st = self.lstat(name)
        if st is None:
            raise KernelError(errno.ENOENT, f"nothing is pinned at {full}")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise KernelError(errno.EINVAL, f"{full} is not a pin")
        with self._errors():
            safefs.check_file(st, full, self.rules)

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
        tmp = f"tmp{secrets.token_hex(8)}"  # no '.' (bpffs refuses it), unlike safefs.stage's
        self.pin(fd, tmp)
        with self._errors():
            safefs.commit(self.fd, tmp, name, os.path.join(self.path, name), self.rules)

    def rename(self, old: str, new: str) -> None:
        try:
            os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as e:
            raise KernelError(e.errno, f"cannot rename {os.path.join(self.path, old)} to {new}: "
                                       f"{e.strerror}") from None

    def unpin(self, name: str) -> bool:
        """Remove the pin `name` (the object lives on while used); False when there was none."""
        return self.unlink(name)


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
