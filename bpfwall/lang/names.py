"""Unknown words: what the user probably meant."""
from __future__ import annotations

import difflib

from .fields import known_names

# Words from other filter languages (pcap, nft) and their nearest names here.
_HINTS = {
    "port": ["dst_port", "src_port", "local_port"],
    "sport": ["src_port"], "dport": ["dst_port"],
    "src": ["saddr", "src_port"], "dst": ["daddr", "dst_port"],
    "host": ["saddr", "daddr", "remote_addr"], "addr": ["saddr", "daddr", "remote_addr"],
    "proto": ["tcp", "udp", "icmp"], "protocol": ["tcp", "udp", "icmp"],
    "length": ["len"], "ip4": ["ip"], "ipv4": ["ip"], "ip6": ["ipv6"],
    "icmp6": ["icmp"], "icmpv6": ["icmp"], "type": ["icmp_type"], "code": ["icmp_code"],
    "AND": ["&&"], "OR": ["||"], "NOT": ["!"],
}


def suggestions(word: str, candidates=None) -> list[str]:
    if candidates is None:
        if word in _HINTS:
            return _HINTS[word]
        candidates = known_names()
    return difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)


def did_you_mean(options: list[str]) -> str:
    """"; did you mean 'a', 'b' or 'c'?" (empty when there is nothing to suggest)."""
    if not options:
        return ""
    quoted = [f"'{o}'" for o in options]
    listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f"; did you mean {listed}?"


def unknown_name(word: str) -> str:
    return f"unknown name '{word}'" + did_you_mean(suggestions(word))
