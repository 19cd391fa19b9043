"""Network devices of this network namespace, as the `ifaces` maps see them.

A cgroup_skb program has the packet's device only as an ifindex (`__sk_buff->ifindex`:
the device it arrived on at ingress, the one it leaves by at egress; measured on loopback
and a veth in a namespace), and ifindexes are unique only within a network namespace, so
a device is (namespace cookie, ifindex). Names are matched here, in user space, and kept
current by following rtnetlink's link messages (RTM_NEWLINK covers appear and rename,
RTM_DELLINK removal).
"""
from __future__ import annotations

import errno
import os
import socket
import struct

from .errors import KernelError

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h (Linux 5.14)
RTMGRP_LINK = 1
RTM_NEWLINK, RTM_GETLINK = 16, 18
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME = 3
_NLMSG = struct.Struct("=IHHII")      # struct nlmsghdr
_IFINFO = struct.Struct("=BxHiII")    # struct ifinfomsg
_RTA = struct.Struct("=HH")           # struct rtattr

# Only AF_NETLINK and AF_UNIX sockets here: the watcher runs with
# RestrictAddressFamilies=AF_UNIX AF_NETLINK (units/bpfwall.service), and glibc's
# if_nameindex() may open an AF_INET socket.


def _align(n: int) -> int:
    return (n + 3) & ~3


def devices() -> dict[int, str]:
    """{ifindex: name} of every device of this thread's network namespace (an RTM_GETLINK dump)."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
        try:
            s.bind((0, 0))
            request = _NLMSG.pack(_NLMSG.size + _IFINFO.size, RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) \
                + _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            s.send(request)
            found: dict[int, str] = {}
            while True:
                data = s.recv(65536)
                off = 0
                while off + _NLMSG.size <= len(data):
                    length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
                    if length < _NLMSG.size:
                        raise OSError(errno.EPROTO, "a malformed rtnetlink message")
                    if kind == NLMSG_DONE:
                        return found
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, off + _NLMSG.size)[0]
                        raise OSError(code, os.strerror(code))
                    if kind == RTM_NEWLINK:
                        _, _, index, _, _ = _IFINFO.unpack_from(data, off + _NLMSG.size)
                        name = _ifname(data, off + _NLMSG.size + _IFINFO.size, off + length)
                        if name is not None:
                            found[index] = name
                    off += _align(length)
        except OSError as e:
            raise KernelError(e.errno or errno.EIO, f"cannot list the network devices: {os.strerror(e.errno or errno.EIO)}") from None


def _ifname(data: bytes, off: int, end: int) -> str | None:
    """IFLA_IFNAME among the attributes in data[off:end]."""
    while off + _RTA.size <= end:
        length, kind = _RTA.unpack_from(data, off)
        if length < _RTA.size:
            return None
        if kind == IFLA_IFNAME:
            return data[off + _RTA.size:off + length].split(b"\0", 1)[0].decode(errors="replace")
        off += _align(length)
    return None


def netns_cookie() -> int:
    """The cookie of this thread's network namespace (what bpf_get_netns_cookie() returns for
    its packets): SO_NETNS_COOKIE works on a socket of any family."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
        except OSError as e:
            raise KernelError(e.errno, f"cannot read the network namespace's cookie: {os.strerror(e.errno)} "
                                       "(Linux 5.14 or later is needed for ifname)") from None


class LinkMonitor:
    """Readable when a device appeared, went or was renamed. The messages are not parsed:
    whoever polls reads the devices again (also after an overflow, which loses messages)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.sock.bind((0, RTMGRP_LINK))
        except OSError as e:
            self.sock.close()
            raise KernelError(e.errno, f"cannot follow link changes (rtnetlink): {os.strerror(e.errno)}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        """Read every waiting message; whether there was any (or an overflow)."""
        seen = False
        while True:
            try:
                if not self.sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise KernelError(e.errno, f"cannot read link changes: {os.strerror(e.errno)}") from None
                seen = True  # messages were lost: read the devices again

    def close(self) -> None:
        self.sock.close()
