"""Read a table's chains, rules and verdict-map keys with netlink dumps (NFT_MSG_GETCHAIN,
NFT_MSG_GETRULE, NFT_MSG_GETSETELEM), not libnftables.

libnftables lists a chain only after filling its cache of the whole table, set
elements included, and prints every cgroupsv2 element by walking the cgroup
tree for its path: about 0.2 s per listing with 1,000 attached cgroups. The
guard only needs which chains exist, how many rules each has and which cgroup
ids each map holds, which the kernel's dumps give directly, in this network
namespace (a few ms for a table of 1,000 units, checked once a second).

A dump spans several datagrams, and the kernel marks them NLM_F_DUMP_INTR when
the ruleset changed between two of them (any change: another program's table
too): such a dump may have skipped or repeated entries, so it is read to its
end and made again (DUMP_TRIES times at most, pausing 1, 2, 4… ms), never taken for damage (which
would make the guard rebuild the table and zero its counters). The kernel
answers a dump at once; one that has not answered within DUMP_TIMEOUT seconds
is an error, not a frozen watcher.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from typing import Iterator

from .errors import NftError

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELRULE = 8
NFT_MSG_GETCHAIN, NFT_MSG_GETRULE, NFT_MSG_GETSETELEM = 4, 7, 13
NFPROTO_INET = 1
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME = 1, 3
NFTA_RULE_TABLE, NFTA_RULE_CHAIN = 1, 2
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLMSG_ERROR, NLMSG_DONE = 2, 3

_HDR = struct.Struct("=IHHII")      # nlmsghdr
_GEN = struct.Struct("=BBH")        # nfgenmsg: family, version, res_id (big endian, 0 here)
_ATTR = struct.Struct("=HH")

DUMP_TRIES = 8
DUMP_TIMEOUT = 5.0  # seconds
interrupted = 0  # dumps made again because the ruleset changed during them (for tests and curious readers)


class Interrupted(Exception):
    """The ruleset changed while a dump was read (NLM_F_DUMP_INTR): its answers are not consistent."""


def _attr(kind: int, text: str) -> bytes:
    data = text.encode() + b"\0"
    return _ATTR.pack(_ATTR.size + len(data), kind) + data + bytes(-len(data) % 4)


def attrs_list(buf: bytes, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """The netlink attributes between `start` and `end`, in order (type, payload)."""
    off = start
    while off + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(buf, off)
        if length < _ATTR.size:
            return
        yield kind & 0x3fff, buf[off + _ATTR.size:off + length]
        off += (length + 3) & ~3


def parse_attrs(buf: bytes, start: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The netlink attributes between `start` and `end` (type → payload)."""
    return dict(attrs_list(buf, start, len(buf) if end is None else end))


def string(payload: bytes | None) -> str | None:
    """A NUL-terminated string attribute's text."""
    return None if payload is None else payload.split(b"\0", 1)[0].decode(errors="replace")


def messages_flags(buf: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, flags, payload start, end) of each netlink message in a datagram; ValueError when
    one is malformed (a length shorter than its header, or past the datagram) or the datagram
    ends in part of a header (cut short: a message is missing)."""
    off = 0
    while off < len(buf):
        if off + _HDR.size > len(buf):
            raise ValueError("netlink datagram cut short")
        length, kind, flags, _, _ = _HDR.unpack_from(buf, off)
        if length < _HDR.size or off + length > len(buf):
            raise ValueError("malformed netlink message")
        yield kind, flags, off + _HDR.size, off + length
        off += (length + 3) & ~3


def messages(buf: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, end) of each netlink message in a datagram (see messages_flags)."""
    for kind, _, start, end in messages_flags(buf):
        yield kind, start, end


def nft_attrs(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    """The attributes of an nf_tables message whose payload (nfgenmsg first) is buf[start:end]."""
    return parse_attrs(buf, start + _GEN.size, end)


def collect(datagrams: list[bytes], what: str) -> list[dict[int, bytes]] | None:
    """The answers (their attributes) in a dump's datagrams, up to NLMSG_DONE; None when the
    kernel says ENOENT; Interrupted when any message carries NLM_F_DUMP_INTR."""
    answers, torn = [], False
    try:
        for buf in datagrams:
            for mtype, flags, start, end in messages_flags(buf):
                torn |= bool(flags & NLM_F_DUMP_INTR)
                if mtype == NLMSG_DONE:
                    if torn:
                        raise Interrupted()
                    return answers
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, start)[0]
                    if code == errno.ENOENT:
                        return None
                    if code:
                        raise NftError(f"{what}: {os.strerror(code)}")
                else:
                    answers.append(nft_attrs(buf, start, end))
    except (ValueError, struct.error):
        raise NftError(f"unreadable netlink answer while {what}") from None
    raise NftError(f"the netlink answer ended early while {what}")


def _last(buf: bytes) -> bool:
    """Whether a datagram ends the answer (holds NLMSG_DONE or an error): a walk of headers only."""
    try:
        return any(kind in (NLMSG_DONE, NLMSG_ERROR) for kind, _, _, _ in messages_flags(buf))
    except ValueError:
        return True  # collect() says it is unreadable


def request(msg_type: int, attrs: bytes) -> bytes:
    """A dump request for nf_tables message `msg_type` of the inet family, with `attrs`."""
    payload = _GEN.pack(NFPROTO_INET, 0, 0) + attrs
    kind = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
    return _HDR.pack(_HDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + payload


def chains_request(table: str) -> bytes:
    # The kernel's chain dump ignores a table in the request and answers with every inet chain.
    return request(NFT_MSG_GETCHAIN, _attr(NFTA_CHAIN_TABLE, table))


def rules_request(table: str, chain: str | None = None) -> bytes:
    return request(NFT_MSG_GETRULE, _attr(NFTA_RULE_TABLE, table)
                   + (_attr(NFTA_RULE_CHAIN, chain) if chain is not None else b""))


def elements_request(table: str, map_name: str) -> bytes:
    return request(NFT_MSG_GETSETELEM, _attr(NFTA_SET_ELEM_LIST_TABLE, table) + _attr(NFTA_SET_ELEM_LIST_SET, map_name))


def receive(request: bytes, what: str, timeout: float = DUMP_TIMEOUT) -> list[bytes]:
    """Send one dump request on a socket of its own; the datagrams of the answer, up to the one
    that ends it. NftError when the kernel has not answered within `timeout` seconds of the last
    datagram.

    Every datagram is read before any is parsed: the kernel makes the next part of a dump
    while we read, so the quicker the reads, the less often a change falls in between."""
    datagrams = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as s:
        s.settimeout(timeout)
        try:
            s.bind((0, 0))
            s.send(request)
            while not datagrams or not _last(datagrams[-1]):
                datagrams.append(s.recv(1 << 20))
        except TimeoutError:
            raise NftError(f"{what}: the kernel did not answer within {timeout:g} s") from None
        except OSError as e:
            raise NftError(f"{what}: {e.strerror or e}") from None
    return datagrams


def exchange(request: bytes, what: str, timeout: float = DUMP_TIMEOUT) -> list[dict[int, bytes]] | None:
    """The answers to one dump request (see receive and collect)."""
    return collect(receive(request, what, timeout), what)


def _dump(request: bytes, what: str) -> list[dict[int, bytes]] | None:
    """The answers (their attributes) to a dump request, from a dump the ruleset did not change
    under; None when the kernel says ENOENT."""
    global interrupted
    for attempt in range(DUMP_TRIES):
        try:
            return exchange(request, what)
        except Interrupted:
            interrupted += 1
            if attempt + 1 < DUMP_TRIES:
                time.sleep(0.001 * 2 ** attempt)  # let a burst of changes pass: 127 ms in all
    raise NftError(f"{what}: the ruleset changed during each of {DUMP_TRIES} dumps in a row")


# -- what the answers say (pure: tests/unit/test_nft_netlink.py reads recorded dumps) ------------

def chains_in(answers: list[dict[int, bytes]] | None, table: str) -> set[str]:
    """The names of `table`'s chains among a chain dump's answers."""
    return {string(a.get(NFTA_CHAIN_NAME)) for a in answers or () if string(a.get(NFTA_CHAIN_TABLE)) == table} - {None}


def rules_per_chain(answers: list[dict[int, bytes]] | None) -> dict[str, int]:
    """{chain: number of rules} in a rule dump's answers."""
    counts: dict[str, int] = {}
    for answer in answers or ():
        name = string(answer.get(NFTA_RULE_CHAIN)) or ""
        counts[name] = counts.get(name, 0) + 1
    return counts


def cgroup_ids(answers: list[dict[int, bytes]]) -> set[int]:
    """The keys of a cgroupsv2 map in an element dump's answers: cgroup ids."""
    keys = set()
    for answer in answers:
        elements = answer.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")
        for kind, elem in attrs_list(elements, 0, len(elements)):
            key = parse_attrs(parse_attrs(elem).get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE)
            if kind == NFTA_LIST_ELEM and key is not None and len(key) == 8:
                keys.add(int.from_bytes(key, sys.byteorder))  # a cgroup id is a host-order u64
    return keys


# -- the queries ---------------------------------------------------------------------------------

def chain_names(table: str) -> set[str]:
    """The names of inet `table`'s chains (none when the table does not exist)."""
    return chains_in(_dump(chains_request(table), f"listing the chains of table inet {table}"), table)


def count_rules(table: str, chain: str | None = None) -> dict[str, int]:
    """{chain: number of rules (at least one)} of inet `table` (only `chain`, if given); chains
    without rules, and chains or a table that do not exist, are absent."""
    return rules_per_chain(_dump(rules_request(table, chain), f"listing the rules of table inet {table}"))


def cgroup_keys(table: str, map_name: str) -> set[int] | None:
    """The cgroup ids that are keys of the cgroupsv2 map `map_name`; None when it does not exist."""
    answers = _dump(elements_request(table, map_name), f"listing map {map_name} of table inet {table}")
    return None if answers is None else cgroup_ids(answers)
