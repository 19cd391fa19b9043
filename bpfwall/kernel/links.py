"""bpf_links on cgroups: attachments that are objects of their own.

Why links for every attachment bpfwall makes itself (attach, the watcher, run):
- A link lives exactly as long as an fd or a pin holds it. Created and not yet
  pinned when the process dies, it is detached by the kernel: a crash can never
  leave a program attached that no pin names.
- BPF_LINK_UPDATE swaps the program atomically (with BPF_F_REPLACE: only if it
  still runs the one we expect), so a reload has no gap and no double.
- Nobody can PROG_DETACH or PROG_ATTACH-REPLACE a link's program; only the
  link's holder changes it.
- Link attachments are always multi (like BPF_F_ALLOW_MULTI) and BPF_PROG_QUERY
  lists their programs with the others, so queries see them.
- The link's info names its cgroup (by id) and program: pinned links are an
  index of where a unit runs that costs nothing to read.
"""
from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass

from . import syscall as sc
from .errors import KernelError

ATTACH_TYPES = {"ingress": sc.BPF_CGROUP_INET_INGRESS, "egress": sc.BPF_CGROUP_INET_EGRESS}
DIRECTION_OF = {v: k for k, v in ATTACH_TYPES.items()}


@dataclass(frozen=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    cgroup_id: int       # 0 once the cgroup is gone (the kernel detached the link with it)
    direction: str | None

    @property
    def defunct(self) -> bool:
        return self.cgroup_id == 0


def create(cgroup_fd: int, prog_fd: int, direction: str, what: str) -> int:
    """A new link running `prog_fd` on the cgroup; its fd (close it and, unpinned, it detaches)."""
    attr = sc.LinkCreateAttr(prog_fd=prog_fd, target_fd=cgroup_fd, attach_type=ATTACH_TYPES[direction])
    return sc.bpf(sc.BPF_LINK_CREATE, attr, f"cannot link {what}")


def update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None, what: str) -> None:
    """Make the link run `new_prog_fd`'s program; with `old_prog_fd`, only if it runs that one now."""
    attr = sc.LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd)
    if old_prog_fd is not None:
        attr.flags, attr.old_prog_fd = sc.BPF_F_REPLACE, old_prog_fd
    sc.bpf(sc.BPF_LINK_UPDATE, attr, f"cannot update {what}")


def detach(link_fd: int) -> None:
    """Detach now, whoever else holds the link (it stays, defunct, until its last holder lets go)."""
    try:
        sc.bpf(sc.BPF_LINK_DETACH, sc.LinkDetachAttr(link_fd=link_fd))
    except KernelError as e:
        if e.errno not in (errno.ENOLINK, errno.ENOENT):  # already detached
            raise e.within("cannot detach link") from None


def info(link_fd: int) -> LinkInfo:
    raw = sc.LinkInfoStruct()
    attr = sc.InfoAttr(bpf_fd=link_fd, info_len=ctypes.sizeof(raw), info=sc.addr(raw))
    sc.bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, f"cannot get info of link fd {link_fd}")
    cgroup = raw.type == sc.BPF_LINK_TYPE_CGROUP
    return LinkInfo(raw.id, raw.type, raw.prog_id, raw.cgroup_id if cgroup else 0,
                    DIRECTION_OF.get(raw.attach_type) if cgroup else None)


def is_link(fd: int) -> bool:
    """Whether the fd is a bpf_link (as opposed to a program or a map): /proc/self/fdinfo says."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            return "link_type:" in f.read()
    except OSError:
        return False
