"""Sockets for real packets on loopback: bound receivers, counting what arrived, ICMP echo.

Sockets belong to the cgroup of the process that created them, so a receiver in a
policed cgroup is made through TempCgroup.socket (or watcher.inside).
"""
from __future__ import annotations

import socket
import struct
from contextlib import contextmanager

SO_RCVBUFFORCE = 33  # Linux; the socket module does not export it
V4, V6 = ("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)


@contextmanager
def udp_receivers(count: int, rcvbuf: int = 0, blocking: bool = True):
    """`count` UDP sockets bound to 127.0.0.1 ports of their own, in this process's cgroup (outside
    what a test polices); `rcvbuf`: room forced for a flood. Closed on leaving."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            s.bind(("127.0.0.1", 0))
            s.setblocking(blocking)
        yield socks
    finally:
        for s in socks:
            s.close()


def receive_all(sock, timeout=0.3) -> int:
    """How many datagrams arrive before `timeout` seconds pass without one."""
    sock.settimeout(timeout)
    n = 0
    try:
        while True:
            sock.recv(2048)
            n += 1
    except (TimeoutError, socket.timeout):
        return n


def bound(cg, host, family, kind=socket.SOCK_DGRAM):
    """A socket bound to an ephemeral port of `host`, in cgroup `cg` (None: ours)."""
    s = cg.socket(family, kind) if cg is not None else socket.socket(family, kind)
    s.bind((host, 0))
    return s


def arrived(rx, tx, port, count=5) -> int:
    """Send `count` datagrams from `tx` to 127.0.0.1:`port`; how many `rx` received."""
    for _ in range(count):
        tx.sendto(b"ping", ("127.0.0.1", port))
    return receive_all(rx)


def icmp_echo(ident: int, seq: int) -> bytes:
    """An ICMP echo request with its checksum."""
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"bpfwall!"
    s = sum(struct.unpack(f"!{len(body) // 2}H", body))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return body[:2] + struct.pack("!H", ~s & 0xFFFF) + body[4:]


def ping(sock, count=3) -> int:
    """Echo requests to 127.0.0.1 from a raw socket; how many replies came back."""
    for seq in range(count):
        try:
            sock.sendto(icmp_echo(0x4242, seq), ("127.0.0.1", 0))
        except PermissionError:
            pass
    sock.settimeout(0.3)
    replies = 0
    try:
        while True:
            data = sock.recv(2048)
            ihl = (data[0] & 0xF) * 4
            if data[ihl] == 0:  # echo reply (the raw socket also sees our own requests)
                replies += 1
    except (TimeoutError, socket.timeout):
        return replies
