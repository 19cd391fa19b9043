"""Packet builders for tests: raw L3 bytes (IPv4/IPv6, options, extension headers, L4 headers)."""
from __future__ import annotations

import ipaddress
import struct

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes = b"", options: bytes = b"",
         frag_offset: int = 0, more_fragments: bool = False, ihl: int | None = None) -> bytes:
    """An IPv4 packet; `ihl` overrides the header length nibble (to build broken headers)."""
    assert len(options) % 4 == 0
    if ihl is None:
        ihl = 5 + len(options) // 4
    total = min(20 + len(options) + len(payload), 0xFFFF)
    flags = (0x2000 if more_fragments else 0) | (frag_offset & 0x1FFF)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl & 0xF), 0, total, 0x1234, flags, 64, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + options
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes = b"") -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload) & 0xFFFF, next_header, 64,
                       ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + payload


def ext(kind: int, next_header: int, units: int = 0, frag_offset: int = 0) -> bytes:
    """One extension header. `units` is the length field: HBH/routing/dstopts (units+1)*8 bytes,
    AH (units+2)*4 bytes; a fragment header is always 8 bytes with `frag_offset` in 8-byte units."""
    if kind == FRAGMENT:
        return struct.pack("!BBHI", next_header, 0, (frag_offset & 0x1FFF) << 3, 0xABCD)
    size = (units + 2) * 4 if kind == AH else (units + 1) * 8
    return bytes([next_header, units]) + bytes(size - 2)


def chain(kinds: list[tuple], final: int) -> tuple[int, bytes]:
    """Extension headers in order, each (kind, units[, frag_offset]); → (first next header, bytes)."""
    out, nh = b"", final
    for spec in reversed(kinds):
        out = ext(spec[0], nh, *spec[1:]) + out
        nh = spec[0]
    return nh, out


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)


def icmp(type_: int, code: int) -> bytes:
    return struct.pack("!BBHI", type_, code, 0, 0)
