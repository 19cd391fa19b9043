"""nfnetlink_log: the packets nft's `log group N` rules hand to user space.

The nft backend's drop events: a unit's chains log what they drop (or would drop, in
audit mode) to one netlink log group, rate-limited by nft's `limit`, with a prefix naming
the unit and direction. This reads them: bind the group (NFULNL_MSG_CONFIG, CMD_BIND),
ask for the first bytes of each packet (COPY_PACKET), and parse NFULNL_MSG_PACKET
messages into (prefix, timestamp, interfaces, L3 payload).

Messages the kernel could not queue for us (a full socket buffer: the socket reports ENOBUFS,
without saying how many) are counted exactly from the group instance's sequence numbers
(NFULNL_CFG_F_SEQ: NFULA_SEQ in every message, one per packet logged): a gap of n is n lost
messages, counted when the next message arrives. The count works as well for a reader that
gets the datagrams second-hand (fanout.py), and covers what was lost on the way to it too.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from .dump import NETLINK_NETFILTER, messages, parse_attrs
from .errors import NftError

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_F_SEQ = 0x0001
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_COPY_PACKET = 2
NFULA_PACKET_HDR = 1
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_SEQ = 12
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5

_HDR = struct.Struct("=IHHII")
_GEN = struct.Struct("=BBH")  # family, version, res_id (big endian: the group)
COPY_BYTES = 128  # enough for IPv6 + 8 extension headers' worth of ports in the common case


@dataclass(frozen=True)
class LoggedPacket:
    prefix: str
    time: float           # seconds since the epoch (the kernel's timestamp when it gives one)
    indev: int | None     # ifindex
    outdev: int | None
    hook: int
    payload: bytes        # the L3 packet, its first COPY_BYTES bytes
    seq: int | None = None  # NFULA_SEQ: packets the group's instance logged before this one


def _attr(kind: int, value: bytes) -> bytes:
    pad = (4 - len(value) % 4) % 4
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * pad


def _config(group: int, attrs: bytes, seq: int) -> bytes:
    body = _GEN.pack(socket.AF_UNSPEC, 0, socket.htons(group)) + attrs
    return _HDR.pack(_HDR.size + len(body), (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG,
                     NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class NflogReader:
    """One bound log group; `read()` returns what arrived, `lost` counts what could not."""

    def __init__(self, group: int, copy_bytes: int = COPY_BYTES, rcvbuf: int = 8 << 20):
        if not 0 <= group <= 65535:
            raise NftError(f"log group {group} is out of range (0..65535)")
        self.group = group
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)  # SO_RCVBUFFORCE (root)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, 0))
            self._request(_attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_BIND) + b"\0" * 3), "bind")
            mode = struct.pack("!IBB", copy_bytes, NFULNL_COPY_PACKET, 0)
            self._request(_attr(NFULA_CFG_MODE, mode), "set the copy mode of")
            # One packet per netlink message, at once: monitor shows events as they happen.
            self._request(_attr(NFULA_CFG_QTHRESH, struct.pack("!I", 1)), "set the queue threshold of")
            self._request(_attr(NFULA_CFG_FLAGS, struct.pack("!H", NFULNL_CFG_F_SEQ)), "number the messages of")
        except BaseException:
            self.sock.close()
            raise
        self.sequence = Sequence()

    @property
    def lost(self) -> int:
        """Messages the kernel could not queue for us, as far as the sequence numbers tell yet."""
        return self.sequence.lost

    def _request(self, attrs: bytes, what: str) -> None:
        self.sock.send(_config(self.group, attrs, 1))
        self.sock.settimeout(5.0)
        try:
            while True:
                data = self.sock.recv(65536)
                for msg_type, start, _end in messages(data):
                    if msg_type == NLMSG_ERROR:
                        err = -struct.unpack_from("=i", data, start)[0]
                        if err:
                            hint = " (another program owns it)" if err == errno.EBUSY else ""
                            raise NftError(f"cannot {what} nflog group {self.group}: {os.strerror(err)}{hint}")
                        return
        except TimeoutError:
            raise NftError(f"cannot {what} nflog group {self.group}: the kernel did not answer") from None
        finally:
            self.sock.settimeout(None)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, timeout: float | None = None) -> list[LoggedPacket]:
        """The packets waiting (blocking up to `timeout` seconds for the first; None: forever)."""
        select.select([self.sock], [], [], timeout)
        return [p for data in self.drain() for p in self.sequence.parse(data)]

    def drain(self) -> list[bytes]:
        """The datagrams waiting, as they came (a Sequence parses them), without blocking."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(1 << 20, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno != errno.ENOBUFS:  # ENOBUFS: messages were dropped; their numbers say how many
                    raise

    def close(self) -> None:
        try:
            self._request(_attr(NFULA_CFG_CMD, struct.pack("=B", NFULNL_CFG_CMD_UNBIND) + b"\0" * 3), "unbind")
        except (NftError, OSError):
            pass
        self.sock.close()

    def __enter__(self) -> "NflogReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Sequence:
    """Parses a group's datagrams in the order they came, counting the messages missing
    between them (`lost`). A group bound anew (a new instance) numbers from 0 again."""

    def __init__(self):
        self.next: int | None = None
        self.lost = 0

    def parse(self, data: bytes) -> list[LoggedPacket]:
        out = []
        for msg_type, start, end in messages(data):
            if msg_type != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
                continue
            a = parse_attrs(data, start + _GEN.size, end)
            hdr = a.get(NFULA_PACKET_HDR, b"\0\0\0\0")
            stamp = a.get(NFULA_TIMESTAMP)
            when = (struct.unpack("!QQ", stamp)[0] + struct.unpack("!QQ", stamp)[1] / 1e6) if stamp else time.time()
            prefix = a.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace")
            seq = struct.unpack("!I", a[NFULA_SEQ])[0] if len(a.get(NFULA_SEQ, b"")) == 4 else None
            if seq is not None:
                if self.next is not None and seq > self.next:
                    self.lost += seq - self.next
                self.next = seq + 1
            out.append(LoggedPacket(prefix, when, _ifindex(a.get(NFULA_IFINDEX_INDEV)),
                                    _ifindex(a.get(NFULA_IFINDEX_OUTDEV)), hdr[2], a.get(NFULA_PAYLOAD, b""), seq))
        return out


def _ifindex(raw: bytes | None) -> int | None:
    return struct.unpack("!I", raw)[0] if raw else None
