"""cgroup2: find it, name cgroups, and attach/detach/query cgroup_skb programs.

Attach policy: BPF_PROG_QUERY first, so attaching twice is a no-op; then
BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI, so our programs coexist with others
(systemd's IP filters, other tools) on the same cgroup and its ancestors;
BPF_F_REPLACE swaps a program in place, with no moment where neither runs.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
from typing import Iterator

from . import links
from . import syscall as sc
from .errors import KernelError
from .progs import prog_get_fd_by_id, prog_info

DIRECTIONS = ("ingress", "egress")
_ATTACH_TYPES = {"ingress": sc.BPF_CGROUP_INET_INGRESS, "egress": sc.BPF_CGROUP_INET_EGRESS}


def cgroup2_mount() -> str:
    """Where cgroup2 is mounted: /sys/fs/cgroup (unified hosts), /sys/fs/cgroup/unified (hybrid)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> <source> ..."
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                # mountinfo escapes space, tab, newline and backslash as \ooo (octal)
                return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), left.split(" ")[4])
    raise KernelError(errno.ENOENT, "cgroup2 is not mounted (no cgroup2 line in /proc/self/mountinfo)")


def resolve(path: str) -> str:
    """The absolute path of a cgroup directory given absolutely or relative to the cgroup2 mount
    (as /proc/PID/cgroup and systemd name them: /system.slice/x.service)."""
    mount = cgroup2_mount()
    candidates = [os.path.join(mount, path.lstrip("/"))]
    if os.path.isabs(path):
        candidates.insert(0, path)
    for candidate in candidates:
        candidate = os.path.normpath(candidate)
        try:
            if os.path.isdir(candidate) and sc.fs_magic(candidate) == sc.CGROUP2_SUPER_MAGIC:
                return candidate
        except OSError:
            pass  # vanished between the checks
    raise KernelError(errno.ENOENT, f"no such cgroup: {path} (cgroup2 is mounted at {mount})")


def cgroup_id(path: str) -> int:
    """The cgroup's id, as bpf_skb_cgroup_id() and bpf_get_current_cgroup_id() report it:
    on cgroup2 (kernfs, 64-bit ids since 5.5) it is the directory's inode number."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        raise KernelError(errno.ENOENT, f"no such cgroup: {path}") from None


def _attach_type(direction: str) -> int:
    if direction not in _ATTACH_TYPES:
        raise KernelError(errno.EINVAL, f"direction must be 'ingress' or 'egress', not {direction!r}")
    return _ATTACH_TYPES[direction]


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KernelError(errno.ENOENT, f"no such cgroup: {path}") from None
    except OSError as e:
        raise KernelError(e.errno, f"cannot open cgroup {path}: {e.strerror}") from None


def _query(fd: int, path: str, direction: str) -> tuple[int, list[int]]:
    count = 64
    while True:
        ids = (ctypes.c_uint32 * count)()
        attr = sc.QueryAttr(target_fd=fd, attach_type=_attach_type(direction),
                            prog_ids=sc.addr(ids), prog_cnt=count)
        try:
            sc.bpf(sc.BPF_PROG_QUERY, attr, f"cannot query the {direction} programs of cgroup {path}")
        except KernelError as e:
            if e.errno == errno.ENOSPC and attr.prog_cnt > count:
                count = attr.prog_cnt  # the kernel reports how many there are
                continue
            raise
        return attr.attach_flags, list(ids[:attr.prog_cnt])


def query(cgroup_path: str, direction: str) -> tuple[int, list[int]]:
    """(attach flags, ids of the programs attached to this cgroup itself, in run order)."""
    fd = _open(cgroup_path)
    try:
        return _query(fd, cgroup_path, direction)
    finally:
        os.close(fd)


def _held(path: str, direction: str, holder: str, prog_id: int, flags: int) -> KernelError:
    if holder == path:
        how = "with BPF_F_ALLOW_OVERRIDE" if flags & sc.BPF_F_ALLOW_OVERRIDE else "without flags"
        why = f"is attached there {how}, not BPF_F_ALLOW_MULTI, so it must be the only one"
    else:
        why = f"is attached to its ancestor {holder} without flags, which forbids programs below it"
    return KernelError(errno.EPERM, (
        f"cannot attach to cgroup {path} ({direction}): program id {prog_id} {why}; detach it "
        f"(bpftool cgroup detach {holder} {direction} id {prog_id}) or have it attached with "
        "BPF_F_ALLOW_MULTI (as systemd does for IPIngressFilterPath=/IPEgressFilterPath=)"))


def _exclusive_ancestor(path: str, direction: str) -> tuple[str, int, int] | None:
    """The nearest ancestor holding a program attached without MULTI or OVERRIDE, if any."""
    mount = cgroup2_mount()
    while path.startswith(mount + "/"):
        path = os.path.dirname(path)
        flags, ids = query(path, direction)
        if ids and not flags & (sc.BPF_F_ALLOW_MULTI | sc.BPF_F_ALLOW_OVERRIDE):
            return path, ids[0], flags
    return None


def attach(cgroup_path: str, prog_fd: int, direction: str, replace_fd: int | None = None) -> bool:
    """Attach the program to the cgroup with BPF_F_ALLOW_MULTI; False if it already was.

    With `replace_fd`, the program attached as `replace_fd` is swapped for this
    one in place (BPF_F_REPLACE). If this one is attached already, nothing
    changes: the old one stays too.
    """
    fd = _open(cgroup_path)
    try:
        flags, ids = _query(fd, cgroup_path, direction)
        prog_id = prog_info(prog_fd).id
        if prog_id in ids:
            return False
        if ids and not flags & sc.BPF_F_ALLOW_MULTI:
            raise _held(cgroup_path, direction, cgroup_path, ids[0], flags)
        attr = sc.AttachAttr(target_fd=fd, attach_bpf_fd=prog_fd, attach_type=_attach_type(direction),
                             attach_flags=sc.BPF_F_ALLOW_MULTI)
        if replace_fd is not None:
            attr.attach_flags |= sc.BPF_F_REPLACE
            attr.replace_bpf_fd = replace_fd
        try:
            sc.bpf(sc.BPF_PROG_ATTACH, attr)
        except KernelError as e:
            if e.errno == errno.EPERM and (holder := _exclusive_ancestor(cgroup_path, direction)):
                raise _held(cgroup_path, direction, *holder) from None
            if e.errno == errno.ENOENT and replace_fd is not None:
                old = prog_info(replace_fd).id
                raise KernelError(e.errno, f"cannot replace program id {old} on cgroup {cgroup_path} "
                                           f"({direction}): it is not attached there") from None
            raise e.within(f"cannot attach program id {prog_id} to cgroup {cgroup_path} ({direction})") from None
        return True
    finally:
        os.close(fd)


def link(cgroup_path: str, prog_fd: int, direction: str) -> int:
    """A new bpf_link running the program on the cgroup (multi); its fd. Unpinned and closed, it
    detaches: pin it to keep it."""
    fd = _open(cgroup_path)
    try:
        try:
            return links.create(fd, prog_fd, direction, f"program id {prog_info(prog_fd).id} to cgroup "
                                                        f"{cgroup_path} ({direction})")
        except KernelError as e:
            if e.errno == errno.EPERM:
                flags, ids = _query(fd, cgroup_path, direction)
                if ids and not flags & sc.BPF_F_ALLOW_MULTI:
                    raise _held(cgroup_path, direction, cgroup_path, ids[0], flags) from None
                if holder := _exclusive_ancestor(cgroup_path, direction):
                    raise _held(cgroup_path, direction, *holder) from None
            raise
    finally:
        os.close(fd)


def _with_prog(prog_id: int, fd: int | None, action) -> bool:
    """action(fd of program `prog_id`); False when the program (or its attachment) is gone.
    Without `fd`, the program is opened by id, which needs CAP_SYS_ADMIN."""
    own = fd is None
    if own:
        try:
            fd = prog_get_fd_by_id(prog_id)
        except KernelError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
    try:
        return action(fd)
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    finally:
        if own:
            os.close(fd)


def replace_id(cgroup_path: str, prog_fd: int, old_id: int, direction: str, old_fd: int | None = None) -> bool:
    """Swap program `old_id` (attached with BPF_PROG_ATTACH, e.g. by systemd; `old_fd` if we hold
    it) for `prog_fd`'s in place; False if `old_id` is no longer attached there."""
    return _with_prog(old_id, old_fd, lambda fd: attach(cgroup_path, prog_fd, direction, replace_fd=fd) or True)


def detach_id(cgroup_path: str, prog_id: int, direction: str, fd: int | None = None) -> bool:
    """Detach program `prog_id` (attached with BPF_PROG_ATTACH; `fd` if we hold it) from the
    cgroup; False if it was not."""
    return _with_prog(prog_id, fd, lambda f: detach(cgroup_path, f, direction))


def detach(cgroup_path: str, prog_fd: int, direction: str) -> bool:
    """Detach the program from the cgroup; False if it was not attached there."""
    fd = _open(cgroup_path)
    try:
        prog_id = prog_info(prog_fd).id
        if prog_id not in _query(fd, cgroup_path, direction)[1]:
            return False
        attr = sc.AttachAttr(target_fd=fd, attach_bpf_fd=prog_fd, attach_type=_attach_type(direction))
        try:
            sc.bpf(sc.BPF_PROG_DETACH, attr)
        except KernelError as e:
            if e.errno == errno.ENOENT:  # detached meanwhile
                return False
            raise e.within(f"cannot detach program id {prog_id} from cgroup {cgroup_path} ({direction})") from None
        return True
    finally:
        os.close(fd)


def walk(root: str | None = None) -> Iterator[str]:
    """Every cgroup directory under `root` (default: the whole cgroup2 tree), parents first.
    Cgroups removed during the walk are skipped."""
    stack = [resolve(root) if root else cgroup2_mount()]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                children = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except (FileNotFoundError, NotADirectoryError):
            continue
        yield path
        stack.extend(sorted(children, reverse=True))


# A systemd unit's cgroup is named after the unit and sits in a slice (a-b.slice lives in
# a.slice), or, for user units, below user@UID.service; nothing else needs descending into.
_SYSTEMD_PARENTS = re.compile(r"(.+\.slice|user@\d+\.service)")


def unit_cgroups(unit: str, root: str | None = None) -> list[str]:
    """The cgroups systemd made for `unit` (its directory is named after it): found by listing
    slices only, so it costs the number of slices, not of cgroups."""
    found, stack = [], [root or cgroup2_mount()]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                for e in entries:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    if e.name == unit:
                        found.append(e.path)
                    elif _SYSTEMD_PARENTS.fullmatch(e.name):
                        stack.append(e.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted(found)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_uint64)]


_FILEID_KERNFS = 0xFE
_libc = ctypes.CDLL(None, use_errno=True)


def paths_of_ids(cgroup_ids) -> dict[int, str | None]:
    """{id: path} of cgroups given by id (open_by_handle_at on cgroup2, which needs
    CAP_DAC_READ_SEARCH); None for one that is gone or when we may not look."""
    mount = cgroup2_mount()
    out: dict[int, str | None] = {}
    try:
        mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return dict.fromkeys(cgroup_ids)
    try:
        for cgroup_id in cgroup_ids:
            handle = _FileHandle(8, _FILEID_KERNFS, cgroup_id)
            fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            if fd < 0:
                out[cgroup_id] = None
                continue
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            # readlink gives the path in our mount namespace; below the cgroup2 mount it must be.
            out[cgroup_id] = path if path == mount or path.startswith(mount + "/") else None
    finally:
        os.close(mount_fd)
    return out


def find_attachments(wanted, paths=None) -> list[tuple[str, str, int]]:
    """(cgroup path, direction, program id) for every attachment of these programs: `wanted` is a
    set of program ids, or a function of a program id. `paths`: the cgroups to look at (default:
    the whole tree, which costs two queries per cgroup)."""
    found: list[tuple[str, str, int]] = []
    if not wanted:
        return found
    keep = wanted.__contains__ if isinstance(wanted, (set, frozenset)) else wanted
    for path in walk() if paths is None else paths:
        try:
            fd = _open(path)
        except KernelError:
            if os.path.isdir(path):
                raise
            continue  # removed since the walk saw it
        try:
            for direction in DIRECTIONS:
                _, ids = _query(fd, path, direction)
                found.extend((path, direction, pid) for pid in ids if keep(pid))
        except KernelError:
            if os.path.isdir(path):
                raise
        finally:
            os.close(fd)
    return found
