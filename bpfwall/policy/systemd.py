"""systemd's per-unit IP firewall in bpfwall's language: IPAddressAllow=/IPAddressDeny= and
RestrictNetworkInterfaces= (systemd.resource-control(5)).

systemd's rule, per packet and in both directions: the remote address (the source of an
incoming packet, the destination of an outgoing one) passes if it lies in an allowed prefix;
else it is dropped if it lies in a denied prefix; else it passes. So allow wins over deny and
what neither lists passes. The same lists apply to both directions. Prefixes are addresses
with an optional /length (host bits are masked, as systemd does) or the names any, localhost,
link-local and multicast, each of which stands for a network of each family.

RestrictNetworkInterfaces= lists the interfaces a unit may use (or, after `~`, may not):
`ifname in {…}`, respectively `!(ifname in {…})`.

A policy entry's own ingress/egress expression and these lists are separate filters that
must both pass, as systemd's own IP firewall and a unit's IP*FilterPath= programs both must:
the entry's filter is `(address filter) && (own expression)`, and the address filter alone
in a direction the entry writes no expression for.
"""
from __future__ import annotations

import ipaddress

from ..lang.fields import ADDRESS_NAMES
from ..lang.values import interface_pattern


def prefixes(words: list[str]) -> list[str]:
    """systemd's prefix words (each item may hold several, space-separated) as the language
    writes them, sorted (systemd keeps a set: its order means nothing): names first, then
    networks, normalized; ValueError naming a bad word."""
    out: list[str] = []
    for item in words:
        for word in item.split():
            if word in ADDRESS_NAMES:
                out.append(word)
                continue
            try:
                net = ipaddress.ip_network(word, strict=False)  # systemd masks host bits
            except ValueError:
                raise ValueError(f"{word!r} is not an address, a network or one of "
                                 f"{', '.join(ADDRESS_NAMES)}") from None
            out.append(str(net) if "/" in word else str(net.network_address))
    return _named(list(dict.fromkeys(out)))  # once each, in order


def _named(words: list[str]) -> list[str]:
    """Both networks of an address name (systemd shows `IPAddressDeny=any` as 0.0.0.0/0 ::/0)
    written as the name; then sorted."""
    nets = {w: ipaddress.ip_network(w) for w in words if w not in ADDRESS_NAMES}
    for name, pair in ADDRESS_NAMES.items():
        found = [w for w, n in nets.items() if n in pair]
        if len({nets[w] for w in found}) == len(pair):
            words = [w for w in words if w not in found] + [name]
    order = list(ADDRESS_NAMES)
    return sorted(dict.fromkeys(words), key=lambda w: (0, order.index(w), 0, w) if w in ADDRESS_NAMES else
                  (1, 0, ipaddress.ip_network(w).version, ipaddress.ip_network(w)))


def _in(words: list[str]) -> str:
    if len(words) == 1 and words[0] in ADDRESS_NAMES or len(words) == 1 and "/" in words[0]:
        return f"remote_addr in {words[0]}"
    return "remote_addr in {" + ", ".join(words) + "}"


def address_filter(allow: list[str], deny: list[str]) -> str | None:
    """The expression for IPAddressAllow=`allow` and IPAddressDeny=`deny` (normalized by
    prefixes()); None when nothing is denied (then every packet passes)."""
    if not deny:
        return None
    if "any" in deny:  # the common `IPAddressDeny=any`: only what is allowed passes
        return _in(allow) if allow else "false"
    denied = f"!({_in(deny)})"
    return f"{_in(allow)} || {denied}" if allow else denied


def interface_filter(names: list[str]) -> str | None:
    """The expression for RestrictNetworkInterfaces=`names` (a leading `~` makes the list a
    deny list, as in systemd); None for an empty list."""
    if names and names[0] == "~":  # systemd writes a deny list as "~" then the names
        names = ["~" + names[1]] + names[2:] if len(names) > 1 else []
    if not names:
        return None
    deny = names[0].startswith("~")
    listed = [interface_pattern(n.lstrip("~") if i == 0 else n) for i, n in enumerate(names)]
    listed = sorted(set(listed))  # systemd keeps a set: its order means nothing
    test = "ifname in {" + ", ".join(f'"{n}"' for n in listed) + "}"
    return f"!({test})" if deny else test


def combine(*exprs: str | None) -> str | None:
    """Filters that must all pass, as one expression (each normalized text kept whole)."""
    present = [e for e in exprs if e is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else " && ".join(f"({e})" for e in present)


# -- `bpfwall import-systemd UNIT` ------------------------------------------------------------

PROPERTIES = ("LoadState", "IPAddressAllow", "IPAddressDeny", "RestrictNetworkInterfaces")


def parse_show(text: str) -> dict[str, str]:
    """`systemctl show -p …` output: one `Name=value` line per property."""
    out = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name in PROPERTIES:
            out[name] = value.strip()
    return out


def entry_toml(unit: str, props: dict[str, str]) -> str:
    """The policy entry that does what the unit's IPAddressAllow=, IPAddressDeny= and
    RestrictNetworkInterfaces= do; ValueError when there is nothing to import or a value
    cannot be expressed."""
    import json

    allow = prefixes([props.get("IPAddressAllow", "")])
    deny = prefixes([props.get("IPAddressDeny", "")])
    interfaces = interface_filter(props.get("RestrictNetworkInterfaces", "").split())
    if not deny and interfaces is None:
        what = "IPAddressAllow= alone (it lets every packet pass)" if allow else \
            "no IPAddressDeny= and no RestrictNetworkInterfaces="
        raise ValueError(f"{unit} has {what}: nothing to import")
    lines = [f"# from systemctl show {unit}:"]
    lines += [f"#   {p}={props[p]}" for p in PROPERTIES[1:] if props.get(p)]
    lines.append(f'[units."{unit}"]')
    if allow:
        lines.append(f"ip_address_allow = {json.dumps(allow)}")
    if deny:
        lines.append(f"ip_address_deny = {json.dumps(deny)}")
    if interfaces is not None:
        lines += [f"ingress = {json.dumps(interfaces)}", f"egress = {json.dumps(interfaces)}"]
    return "\n".join(lines) + "\n"
