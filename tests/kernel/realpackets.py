"""Real packets between a policed cgroup and the rest of a private network namespace.

`NetNamespace` gives the test a network namespace of its own, entered by this
thread (setns is per thread; sockets keep the namespace they were made in), with
the addresses the expression strategies name configured on its loopback. That
makes `saddr in 10.0.0.0/24` or `daddr == 2001:db8::2` real, and a ping group
range can be set without touching the host.

`PacketSpec` describes one packet the kernel builds for us (UDP datagram, TCP
SYN, ICMP message) and knows the fields the reference evaluator reads for it.
`Exchange` sends a batch of them across the cgroup boundary in one direction and
reports, for each, whether it arrived. Every packet is recognisable on arrival:
UDP by its 4-tuple, TCP by its client socket, ICMP by a per-batch tag in the
echo sequence field.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import random
import select
import socket
import struct
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import strategies as st

from bpfwall.lang.packet import ICMP, ICMPV6, TCP, UDP, PacketFields
from tests.strategies import ICMP4_TYPES, ICMP6_TYPES, LENGTHS, PORTS, mostly
from tests.unit.packets import _checksum as internet_checksum

# Addresses on the namespace's loopback: hosts of the expression pools (tests/strategies.py)
# that a socket can send from; any 127.0.0.0/8 address works too.
V4_ADDRS = ["127.0.0.1", "10.0.0.1", "10.0.0.2", "10.1.2.3", "192.168.1.1"]
V6_ADDRS = ["::1", "2001:db8::1", "2001:db8::2", "2001:db8:1::5"]

IP_HEADER = {4: 20, 6: 40}
UDP_HEADER = ICMP_HEADER = 8
# A Linux SYN carries MSS (4), SACK-permitted + timestamps (12) and window scale (4) options,
# with the per-namespace sysctls that NetNamespace pins; test_parity checks it on the wire.
TCP_SYN_HEADER = 40
TCP_SYSCTLS = {"net.ipv4.tcp_timestamps": "1", "net.ipv4.tcp_sack": "1", "net.ipv4.tcp_window_scaling": "1"}

KINDS = ("udp", "tcp", "ping", "icmp")  # ping: an echo request from a ping socket; icmp: a raw ICMP socket
INGRESS_KINDS = ("udp", "tcp")  # nft's `socket cgroupv2` finds no socket for incoming ICMP
SO_RCVBUFFORCE = 33
IPV6_DSTOPTS = 59  # Linux; the socket module does not export it
IP_OPTION_SIZES, DSTOPT_SIZES = [4, 8, 40], [8, 16, 24]


# -- the namespace --------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class NetNamespace:
    """A uniquely named network namespace; this thread lives in it while the context is open
    (or while `entered()` is, for a namespace made with `create()`)."""

    def __init__(self, prefix: str = "bpfwall-test"):
        self.name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self._homes: list[int] = []

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def create(self) -> "NetNamespace":
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self._ip("link", "set", "lo", "up")
            for a in V4_ADDRS[1:]:
                self._ip("addr", "add", f"{a}/32", "dev", "lo")
            for a in V6_ADDRS[1:]:
                self._ip("addr", "add", f"{a}/128", "dev", "lo", "nodad")
            # Root may open ping sockets here (and only here: the sysctl is per namespace).
            sysctls = {"net.ipv4.ping_group_range": "0 0", **TCP_SYSCTLS}
            subprocess.run(["ip", "netns", "exec", self.name, "sysctl", "-q",
                            *(f"{k}={v}" for k, v in sysctls.items())], check=True, capture_output=True)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def enter(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        except BaseException:
            os.close(home)
            raise
        self._homes.append(home)

    def leave(self) -> None:
        home = self._homes.pop()
        try:
            _setns(home)
        finally:
            os.close(home)

    @contextmanager
    def entered(self):
        self.enter()
        try:
            yield self
        finally:
            self.leave()

    def __enter__(self) -> "NetNamespace":
        self.create()
        try:
            self.enter()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            while self._homes:
                self.leave()
        finally:
            self.remove()


# -- one packet -------------------------------------------------------------------

@dataclass(frozen=True)
class PacketSpec:
    kind: str          # one of KINDS
    family: int        # 4 or 6
    saddr: str
    daddr: str
    sport: int = 0     # TCP/UDP only
    dport: int = 0
    payload: int = 0   # bytes after the L4 header (a SYN carries none)
    icmp_type: int = 0
    icmp_code: int = 0
    options: int = 0   # TCP/UDP: bytes of IPv4 options, or of an IPv6 destination-options header

    @property
    def proto(self) -> int:
        if self.kind in ("udp", "tcp"):
            return UDP if self.kind == "udp" else TCP
        return ICMP if self.family == 4 else ICMPV6

    def l4_header(self) -> int:
        return TCP_SYN_HEADER if self.kind == "tcp" else UDP_HEADER if self.kind == "udp" else ICMP_HEADER

    def fields(self) -> PacketFields:
        """What the reference evaluator reads for the packet the kernel builds from this spec
        (every packet goes by the namespace's loopback, both ways)."""
        ports = (self.sport, self.dport) if self.kind in ("udp", "tcp") else (0, 0)
        icmp = (self.icmp_type, self.icmp_code) if self.kind in ("ping", "icmp") else (0, 0)
        return PacketFields(self.family, self.proto, True, *ports, *icmp,
                            IP_HEADER[self.family] + self.options + self.l4_header() + self.payload,
                            ipaddress.ip_address(self.saddr), ipaddress.ip_address(self.daddr), ifname="lo")

    def describe(self) -> str:
        where = f"{self.saddr}:{self.sport} -> {self.daddr}:{self.dport}" if self.kind in ("udp", "tcp") \
            else f"{self.saddr} -> {self.daddr} type {self.icmp_type} code {self.icmp_code}"
        extra = f" ({self.options} bytes of {'IP options' if self.family == 4 else 'destination options'})" \
            if self.options else ""
        return f"{self.kind}/v{self.family} {where}, len {self.fields().length}{extra}"

    def sockopt(self) -> tuple[int, int, bytes] | None:
        """The socket option that makes the kernel add this spec's header options."""
        if not self.options:
            return None
        if self.family == 4:  # NOPs, then end of options
            return socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01" * (self.options - 1) + b"\x00"
        # One option the receiver skips (type 0x1e: experimental, action "skip"); long runs of
        # padding alone are dropped on receipt (more than 7 pad bytes is malformed for Linux).
        return (socket.IPPROTO_IPV6, IPV6_DSTOPTS,
                bytes([0, self.options // 8 - 1, 0x1E, self.options - 4]) + bytes(self.options - 4))


# -- hypothesis strategies -------------------------------------------------------

_PORTS = [p for p in PORTS if p]  # port 0 cannot be bound or sent to
# Payload sizes that put `len` on the strategies' LENGTHS pool for v4 and v6, UDP and ICMP.
_PAYLOADS = sorted({n - IP_HEADER[f] - 8 for n in LENGTHS for f in (4, 6) if n - IP_HEADER[f] - 8 >= 0})


def _v4_addr():
    loopback = st.integers(2, 2**24 - 2).map(lambda v: str(ipaddress.IPv4Address((127 << 24) | v)))
    return mostly(st.sampled_from(V4_ADDRS), loopback)


def _addr(family: int):
    return _v4_addr() if family == 4 else st.sampled_from(V6_ADDRS)


@st.composite
def packet_specs(draw, kinds=KINDS) -> PacketSpec:
    kind = draw(st.sampled_from(kinds))
    family = draw(st.sampled_from([4, 6]))
    saddr, daddr = draw(_addr(family)), draw(_addr(family))
    if kind in ("udp", "tcp"):
        port = mostly(st.sampled_from(_PORTS), st.integers(1, 65535))
        payload = draw(mostly(st.sampled_from(_PAYLOADS), st.integers(0, 1600))) if kind == "udp" else 0
        options = draw(mostly(st.just(0), st.sampled_from(IP_OPTION_SIZES if family == 4 else DSTOPT_SIZES)))
        return PacketSpec(kind, family, saddr, daddr, draw(port), draw(port), payload, options=options)
    payload = draw(mostly(st.sampled_from(_PAYLOADS), st.integers(0, 1600)))
    if kind == "ping":
        return PacketSpec(kind, family, saddr, daddr, payload=payload, icmp_type=8 if family == 4 else 128)
    types = ICMP4_TYPES if family == 4 else ICMP6_TYPES
    return PacketSpec(kind, family, saddr, daddr, payload=payload,
                      icmp_type=draw(mostly(st.sampled_from(types), st.integers(0, 255))),
                      icmp_code=draw(mostly(st.sampled_from([0, 1, 3]), st.integers(0, 255))))


def compatible(batch: list[PacketSpec]) -> list[PacketSpec]:
    """The specs that can share one batch, in order (see Exchange for the sockets each needs).

    A (proto, address, port) is either a sending socket (with one set of header options) or a
    receiving one, never both; a UDP 4-tuple and a TCP client endpoint occur once, so each
    packet is recognised on arrival.
    """
    roles: dict[tuple, tuple] = {}
    tuples: set = set()
    kept = []
    for spec in batch:
        if spec.kind not in ("udp", "tcp"):
            kept.append(spec)
            continue
        src, dst = (spec.kind, spec.family, spec.saddr, spec.sport), (spec.kind, spec.family, spec.daddr, spec.dport)
        four = src + dst[2:]
        tx, rx = ("tx", spec.options), ("rx", 0)
        if src == dst or roles.get(src, tx) != tx or roles.get(dst, rx) != rx or four in tuples:
            continue
        if spec.kind == "tcp" and src in roles:  # a TCP client socket makes one connection
            continue
        roles[src], roles[dst] = tx, rx
        tuples.add(four)
        kept.append(spec)
    return kept


def batches(direction: str, size: int):
    """`size` or a few fewer (conflicts removed) specs that can cross the boundary in `direction`."""
    kinds = KINDS if direction == "egress" else INGRESS_KINDS
    return st.lists(packet_specs(kinds), min_size=size, max_size=size).map(compatible)


# -- sending a batch ---------------------------------------------------------------

def _family(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def _icmp_message(spec: PacketSpec, ident: int, seq: int) -> bytes:
    """Header with the tag in the echo id/seq slot (free for every other type), then payload.
    The kernel fills ICMPv6 checksums and ping sockets' ids; ICMPv4 checksums are ours."""
    body = struct.pack("!BBHHH", spec.icmp_type, spec.icmp_code, 0, ident, seq) + b"\xa5" * spec.payload
    if spec.family == 4 and spec.kind == "icmp":
        body = body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]
    return body


@dataclass(frozen=True)
class _Socket:
    inside: bool       # made inside the policed cgroup
    family: int
    type: int
    proto: int
    bind: tuple
    sockopt: tuple | None = None


class Exchange:
    """Sockets for one batch: the policed side inside `cgroup`, the other side outside.

    egress: senders inside, receivers outside; ingress: the reverse (UDP and TCP only).
    Open it (sockets are made and bound), attach a filter, call `run()`; the sockets
    close on exit, so close it after detaching: a TCP reset then leaves nothing behind.
    """

    def __init__(self, specs: list[PacketSpec], direction: str, cgroup, outside=None, rejects: bool = False):
        """`outside`: a context in which the other side's sockets are made (another network
        namespace; default: where this thread is); `rejects`: a connect answered by an ICMP
        error or a reset (an nft reject) did not arrive, rather than being an error."""
        if direction == "ingress" and any(s.kind not in INGRESS_KINDS for s in specs):
            raise ValueError("ICMP is exchanged on egress only")
        self.specs, self.direction, self.cgroup = specs, direction, cgroup
        self.outside, self.rejects = outside or contextlib.nullcontext, rejects
        self.sockets: list[socket.socket] = []
        self.nonce = random.randrange(1 << 16)

    # sockets
    def _new(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        s = socket.socket(_family(family), kind, proto)
        self.sockets.append(s)
        if family == 6 and proto == 0:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        return s

    def _sides(self) -> tuple[bool, bool]:
        """(senders inside the cgroup?, receivers inside the cgroup?)"""
        return (True, False) if self.direction == "egress" else (False, True)

    def __enter__(self) -> "Exchange":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()

    def _open(self) -> None:
        tx_inside, rx_inside = self._sides()
        wanted: dict[tuple, _Socket] = {}  # by key; several packets may share a socket
        for i, spec in enumerate(self.specs):
            f, dgram = spec.family, socket.SOCK_DGRAM
            icmp = socket.IPPROTO_ICMP if f == 4 else socket.IPPROTO_ICMPV6
            if spec.kind in ("udp", "tcp"):
                kind = dgram if spec.kind == "udp" else socket.SOCK_STREAM
                tx_key = ("udp-tx", f, spec.saddr, spec.sport) if spec.kind == "udp" else ("tcp-tx", i)
                wanted[tx_key] = _Socket(tx_inside, f, kind, 0, (spec.saddr, spec.sport), spec.sockopt())
                wanted[(spec.kind + "-rx", f, spec.daddr, spec.dport)] = _Socket(rx_inside, f, kind, 0,
                                                                                 (spec.daddr, spec.dport))
            elif spec.kind == "ping":
                wanted[("ping", i)] = _Socket(True, f, dgram, icmp, (spec.saddr, 0))
            else:
                wanted[("raw", f, spec.saddr)] = _Socket(True, f, socket.SOCK_RAW, icmp, (spec.saddr, 0))
        self.by_key: dict = {}
        for inside in (False, True):
            todo = [(k, w) for k, w in wanted.items() if w.inside == inside]
            if inside and todo:
                with self.cgroup.entered():  # sockets belong to the cgroup they are created in
                    made = [self._new(w.family, w.type, w.proto) for _, w in todo]
            else:
                with self.outside():  # and to the network namespace
                    made = [self._new(w.family, w.type, w.proto) for _, w in todo]
            self.by_key.update((k, s) for (k, _), s in zip(todo, made, strict=False))
        for key, s in self.by_key.items():
            if wanted[key].sockopt:
                s.setsockopt(*wanted[key].sockopt)
            s.bind(wanted[key].bind)
            if key[0] == "tcp-rx":
                s.listen(128)
            elif key[0] == "udp-rx":
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            s.setblocking(False)
        # Sniffers outside see every ICMP message that arrives (raw sockets get a copy first).
        self.sniffers = []
        if any(s.kind in ("ping", "icmp") for s in self.specs):
            for family, proto in ((4, socket.IPPROTO_ICMP), (6, socket.IPPROTO_ICMPV6)):
                with self.outside():
                    s = self._new(family, socket.SOCK_RAW, proto)
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
                s.setblocking(False)
                self.sniffers.append((family, s))

    # traffic
    def _send(self, i: int, spec: PacketSpec):
        """Send one packet; what identifies it on arrival."""
        try:
            if spec.kind == "udp":
                self.by_key[("udp-tx", spec.family, spec.saddr, spec.sport)].sendto(
                    b"\x5a" * spec.payload, (spec.daddr, spec.dport))
                return ("udp", spec.family, spec.saddr, spec.sport, spec.daddr, spec.dport, spec.payload)
            if spec.kind == "tcp":
                s = self.by_key[("tcp-tx", i)]
                err = s.connect_ex((spec.daddr, spec.dport))
                if err not in (0, errno.EINPROGRESS, errno.EPERM):
                    raise OSError(err, f"connect {spec.describe()}: {os.strerror(err)}")
                return ("tcp", i)
            s = self.by_key[("ping", i)] if spec.kind == "ping" else self.by_key[("raw", spec.family, spec.saddr)]
            ident = s.getsockname()[1] if spec.kind == "ping" else self.nonce
            s.sendto(_icmp_message(spec, ident, i), (spec.daddr, 0))
            return ("icmp", spec.family, spec.icmp_type, spec.icmp_code, ident, i, spec.payload)
        except PermissionError:  # an egress drop reports EPERM to the sender
            return None

    def run(self, settle: float = 0.1) -> list[bool]:
        """Send every packet, wait `settle` seconds, then: did each one arrive?"""
        for _, s in self.sniffers:  # nothing from before this batch counts
            _drain(s)
        keys = [self._send(i, spec) for i, spec in enumerate(self.specs)]
        self._wait_connects(keys, settle)
        arrived = self._arrivals()
        out = []
        for key in keys:
            if key is None:
                out.append(False)
            elif key[0] == "tcp":
                out.append(_connected(self.by_key[("tcp-tx", key[1])], self.rejects))
            else:
                out.append(key in arrived)
        return out

    def _wait_connects(self, keys, settle: float) -> None:
        """Sleep `settle`; a passed SYN connects in microseconds, a dropped one is retried after 1 s."""
        pending = [self.by_key[("tcp-tx", k[1])] for k in keys if k and k[0] == "tcp"]
        deadline = time.monotonic() + settle
        while (left := deadline - time.monotonic()) > 0:
            if pending:
                _, ready, _ = select.select([], pending, [], left)
                pending = [s for s in pending if s not in ready]
            else:
                time.sleep(left)

    def _arrivals(self) -> set:
        got = set()
        for key, s in self.by_key.items():
            if key[0] != "udp-rx":
                continue
            _, family, daddr, dport = key
            for data, addr in _drain(s):
                src = ipaddress.ip_address(addr[0]).compressed
                got.add(("udp", family, src, addr[1], daddr, dport, len(data)))
        for family, s in self.sniffers:
            for data, _ in _drain(s):
                if family == 4:
                    data = data[(data[0] & 0xF) * 4:]
                if len(data) >= 8:
                    kind, code, _, ident, seq = struct.unpack("!BBHHH", data[:8])
                    got.add(("icmp", family, kind, code, ident, seq, len(data) - 8))
        return got


def _drain(s: socket.socket) -> list:
    out = []
    while True:
        try:
            out.append(s.recvfrom(65536))
        except (BlockingIOError, InterruptedError):
            return out


_REJECTED = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES)


def _connected(s: socket.socket, rejects: bool = False) -> bool:
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err in _REJECTED and rejects:
        return False
    if err not in (0, errno.EPERM):
        raise AssertionError("a TCP connect failed for another reason than a drop")
    try:
        s.getpeername()
        return True
    except OSError:
        return False
