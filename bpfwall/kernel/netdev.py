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


def devices() -> dict[int, str]:
    """{ifindex: name} of every device of this thread's network namespace."""
    return {index: name for index, name in socket.if_nameindex()}


def netns_cookie() -> int:
    """The cookie of this thread's network namespace (what bpf_get_netns_cookie() returns for
    its packets)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
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
