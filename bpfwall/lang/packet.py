"""Raw L3 bytes → the fields the language reads. The reference for bpf/port_filter.c's parser."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Union

from .errors import PacketError

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60
MAX_EXT_HEADERS = 8


@dataclass(frozen=True)
class PacketFields:
    family: int            # 4 or 6
    proto: int | None      # final L4 protocol; None when it cannot be known
    l4: bool               # the L4 header belongs to this packet (not a non-first fragment)
    src_port: int
    dst_port: int
    icmp_type: int
    icmp_code: int
    length: int            # bytes of the L3 packet
    saddr: Address
    daddr: Address
    # The interface it arrives on (ingress) or leaves by (egress); None: none that bpfwall knows
    # by name (another network namespace's). Not in the bytes: given by whoever has the packet.
    ifname: str | None = None

    @property
    def ip(self) -> bool:
        return self.family == 4

    @property
    def ipv6(self) -> bool:
        return self.family == 6

    @property
    def tcp(self) -> bool:
        return self.proto == TCP

    @property
    def udp(self) -> bool:
        return self.proto == UDP

    @property
    def icmp(self) -> bool:
        return self.proto == (ICMP if self.family == 4 else ICMPV6)


def parse_packet(data: bytes) -> PacketFields:
    data = bytes(data)
    if not data:
        raise PacketError("not an IPv4 or IPv6 packet (empty)")
    version = data[0] >> 4
    if version == 4:
        if len(data) < 20:
            raise PacketError(f"IPv4 packet too short ({len(data)} bytes; the header alone is 20)")
        proto, l4, off = _v4_l4(data)
        saddr, daddr = ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20])
    elif version == 6:
        if len(data) < 40:
            raise PacketError(f"IPv6 packet too short ({len(data)} bytes; the header alone is 40)")
        proto, l4, off = _v6_l4(data)
        saddr, daddr = ipaddress.IPv6Address(data[8:24]), ipaddress.IPv6Address(data[24:40])
    else:
        raise PacketError(f"not an IPv4 or IPv6 packet (version {version})")
    ports = icmp = (0, 0)
    icmp_proto = ICMP if version == 4 else ICMPV6
    if l4 and proto in (TCP, UDP) and off + 4 <= len(data):
        ports = (data[off] << 8 | data[off + 1], data[off + 2] << 8 | data[off + 3])
    elif l4 and proto == icmp_proto and off + 2 <= len(data):
        icmp = (data[off], data[off + 1])
    return PacketFields(version, proto, l4, ports[0], ports[1], icmp[0], icmp[1], len(data), saddr, daddr)


def _v4_l4(data: bytes) -> tuple[int | None, bool, int]:
    """(proto, l4, L4 offset) of an IPv4 packet."""
    ihl = data[0] & 0xF
    if ihl < 5 or ihl * 4 > len(data):
        return None, False, 0
    non_first_fragment = (data[6] << 8 | data[7]) & 0x1FFF
    return data[9], not non_first_fragment, ihl * 4


def _v6_l4(data: bytes) -> tuple[int | None, bool, int]:
    """(proto, l4, L4 offset) after walking at most MAX_EXT_HEADERS extension headers."""
    nh, off = data[6], 40
    for _ in range(MAX_EXT_HEADERS):
        if nh not in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT, AH):
            return nh, True, off  # the offset may lie beyond the packet: then L4 fields read 0
        if nh == FRAGMENT:
            if off + 8 > len(data):
                return None, False, 0
            frag_offset = (data[off + 2] << 8 | data[off + 3]) >> 3
            nh, off = data[off], off + 8
            if frag_offset:
                return nh, False, 0
        else:
            if off + 2 > len(data):
                return None, False, 0
            hdrlen = data[off + 1]
            size = (hdrlen + 2) * 4 if nh == AH else (hdrlen + 1) * 8
            nh, off = data[off], off + size
    if nh in (HOPOPTS, ROUTING, DSTOPTS, FRAGMENT, AH):
        return None, False, 0  # a ninth extension header: give up, as the kernel program does
    return nh, True, off


def as_dict(fields: PacketFields) -> dict:
    """JSON-friendly: every field, the protocol booleans, addresses as text."""
    return {
        "family": fields.family, "proto": fields.proto, "l4": fields.l4,
        "ip": fields.ip, "ipv6": fields.ipv6, "tcp": fields.tcp, "udp": fields.udp, "icmp": fields.icmp,
        "src_port": fields.src_port, "dst_port": fields.dst_port,
        "icmp_type": fields.icmp_type, "icmp_code": fields.icmp_code, "length": fields.length,
        "saddr": str(fields.saddr), "daddr": str(fields.daddr),
    }
