"""Count the rules of a table's chains with one netlink dump (NFT_MSG_GETRULE), not libnftables.

libnftables lists a chain only after filling its cache of the whole table, set
elements included, and prints every cgroupsv2 element by walking the cgroup
tree for its path: about 0.2 s per listing with 1,000 attached cgroups. The
guard only needs how many rules each chain has, which the kernel's rule dump
gives directly (filtered by table, optionally chain), in this network namespace.
"""
from __future__ import annotations

import errno
import os
import socket
import struct

from .errors import NftError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETRULE = 7
NFPROTO_INET = 1
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3

_HDR = struct.Struct("=IHHII")      # nlmsghdr
_GEN = struct.Struct("=BBH")        # nfgenmsg: family, version, res_id (big endian, 0 here)
_ATTR = struct.Struct("=HH")


def _attr(kind: int, text: str) -> bytes:
    data = text.encode() + b"\0"
    return _ATTR.pack(_ATTR.size + len(data), kind) + data + bytes(-len(data) % 4)


def parse_attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """The netlink attributes between `start` and `end` (type → payload)."""
    out, off = {}, start
    while off + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(buf, off)
        if length < _ATTR.size:
            break
        out[kind & 0x3fff] = buf[off + _ATTR.size:off + length]
        off += (length + 3) & ~3
    return out


def string(payload: bytes | None) -> str | None:
    """A NUL-terminated string attribute's text."""
    return None if payload is None else payload.split(b"\0", 1)[0].decode(errors="replace")


def count_rules(table: str, chain: str | None = None) -> dict[str, int] | None:
    """{chain: number of rules (at least one)} of inet `table` (only `chain`, if given); chains
    without rules are absent. None when the table (or the chain) does not exist."""
    payload = _GEN.pack(NFPROTO_INET, 0, 0) + _attr(NFTA_RULE_TABLE, table)
    if chain is not None:
        payload += _attr(NFTA_RULE_CHAIN, chain)
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
    request = _HDR.pack(_HDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + payload
    counts: dict[str, int] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as s:
        s.bind((0, 0))
        s.send(request)
        while True:
            buf = s.recv(1 << 20)
            off = 0
            while off + _HDR.size <= len(buf):
                length, mtype, _, _, _ = _HDR.unpack_from(buf, off)
                if length < _HDR.size:
                    raise NftError("unreadable netlink answer while counting rules")
                if mtype == NLMSG_DONE:
                    return counts
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, off + _HDR.size)[0]
                    if code == 0:  # the ACK
                        off += (length + 3) & ~3
                        continue
                    if code == errno.ENOENT:
                        return None
                    raise NftError(f"cannot list the rules of table inet {table}: {os.strerror(code)}")
                name = string(parse_attrs(buf, off + _HDR.size + _GEN.size, off + length).get(NFTA_RULE_CHAIN))
                counts[name] = counts.get(name, 0) + 1
                off += (length + 3) & ~3
