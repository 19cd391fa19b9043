"""The packet fields the language knows, their types and the direction-neutral aliases."""
from __future__ import annotations

import ipaddress

BOOL, NUMBER, ADDR, IFACE = "bool", "number", "address", "interface"

# name -> (type, bit width of the value the packet can hold; 0 for non-numbers)
FIELDS = {
    "ip": (BOOL, 0),
    "ipv6": (BOOL, 0),
    "icmp": (BOOL, 0),
    "tcp": (BOOL, 0),
    "udp": (BOOL, 0),
    "src_port": (NUMBER, 16),
    "dst_port": (NUMBER, 16),
    "len": (NUMBER, 32),
    "icmp_type": (NUMBER, 8),
    "icmp_code": (NUMBER, 8),
    "saddr": (ADDR, 0),
    "daddr": (ADDR, 0),
    "ifname": (IFACE, 0),
}

# alias -> (field on ingress, field on egress): on ingress the local end is the destination.
ALIASES = {
    "local_port": ("dst_port", "src_port"),
    "remote_port": ("src_port", "dst_port"),
    "local_addr": ("daddr", "saddr"),
    "remote_addr": ("saddr", "daddr"),
}

# name -> (what it is, an example): the language reference (`bpfwall help language`) is made
# from this and the tables above; a test checks that every field and alias has an entry.
MEANINGS = {
    "ip": ("an IPv4 packet", "ip && tcp"),
    "ipv6": ("an IPv6 packet", "ipv6 && udp"),
    "icmp": ("ICMP on IPv4, ICMPv6 on IPv6", "icmp && icmp_type == 8"),
    "tcp": ("a TCP packet", "tcp && dst_port == 443"),
    "udp": ("a UDP packet", "udp && dst_port == 53"),
    "src_port": ("TCP/UDP source port", "src_port >= 1024"),
    "dst_port": ("TCP/UDP destination port", "dst_port in {80, 443}"),
    "len": ("bytes of the L3 packet, IP header included", "len <= 1500"),
    "icmp_type": ("ICMP/ICMPv6 type", "icmp_type == 8"),
    "icmp_code": ("ICMP/ICMPv6 code", "icmp && icmp_code == 0"),
    "saddr": ("source address", "saddr in 10.0.0.0/8"),
    "daddr": ("destination address", "daddr == ::1"),
    "ifname": ("the device the packet arrives on (ingress) or leaves by (egress); \"wlan*\" matches "
               "every name that begins with wlan; ==, != or in a {…} of names", 'ifname in {"wg0", "wlan*"}'),
    "local_port": ("the unit's own port: dst_port on ingress, src_port on egress", "local_port == 8080"),
    "remote_port": ("the peer's port: src_port on ingress, dst_port on egress", "remote_port == 53"),
    "local_addr": ("the unit's own address: daddr on ingress, saddr on egress", "local_addr in 127.0.0.0/8"),
    "remote_addr": ("the peer's address: saddr on ingress, daddr on egress", "remote_addr in {10.0.0.1, fd00::/8}"),
}

# systemd's address names (IPAddressAllow=, systemd.resource-control(5); in systemd's source
# src/shared/in-addr-prefix-util.c): each stands for one network of each family.
ADDRESS_NAMES = {
    name: tuple(ipaddress.ip_network(n) for n in nets) for name, nets in (
        ("any", ("0.0.0.0/0", "::/0")),
        ("localhost", ("127.0.0.0/8", "::1/128")),
        ("link-local", ("169.254.0.0/16", "fe80::/64")),
        ("multicast", ("224.0.0.0/4", "ff00::/8")),
    )
}

DIRECTIONS = ("ingress", "egress")


def resolve(name: str, direction: str) -> str:
    """The concrete field an (alias) name reads in `direction`."""
    if name in ALIASES:
        return ALIASES[name][DIRECTIONS.index(direction)]
    return name


def field_type(name: str) -> tuple[str, int]:
    """(type, bits) of a field or alias name; KeyError when unknown."""
    return FIELDS[resolve(name, "ingress")]


def known_names() -> list[str]:
    return sorted(list(FIELDS) + list(ALIASES) + list(ADDRESS_NAMES) + ["true", "false"])
