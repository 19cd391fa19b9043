"""The packet fields the language knows, their types and the direction-neutral aliases."""
from __future__ import annotations

BOOL, NUMBER, ADDR = "bool", "number", "address"

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
}

# alias -> (field on ingress, field on egress): on ingress the local end is the destination.
ALIASES = {
    "local_port": ("dst_port", "src_port"),
    "remote_port": ("src_port", "dst_port"),
    "local_addr": ("daddr", "saddr"),
    "remote_addr": ("saddr", "daddr"),
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
    return sorted(list(FIELDS) + list(ALIASES) + ["true", "false"])
