"""ip_address_allow / ip_address_deny: systemd's IPAddressAllow=/IPAddressDeny= rule, exactly,
and how it meets an entry's own expression; RestrictNetworkInterfaces= as an expression."""
from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.policy.schema import check_document
from bpfwall.policy.systemd import entry_toml, interface_filter, parse_show, prefixes
from tests import strategies as S

# systemd.resource-control(5), IPAddressAllow=: the names, written out here on their own so that
# the model does not share bpfwall's table.
SYSTEMD_NAMES = {"any": ["0.0.0.0/0", "::/0"], "localhost": ["127.0.0.0/8", "::1/128"],
                 "link-local": ["169.254.0.0/16", "fe80::/64"], "multicast": ["224.0.0.0/4", "ff00::/8"]}
WORDS = list(SYSTEMD_NAMES) + S.V4_NETS + S.V6_NETS + S.V4_HOSTS[:4] + S.V6_HOSTS[:4] + ["10.0.0.1/8"]


def systemd_verdict(remote, allow: list[str], deny: list[str]) -> bool:
    """systemd's rule for one packet: allowed prefix → pass; else denied prefix → drop; else pass."""
    def hits(words):
        for w in words:
            for net in SYSTEMD_NAMES.get(w, [w]):
                n = ipaddress.ip_network(net, strict=False)
                if n.version == remote.version and remote in n:
                    return True
        return False
    return hits(allow) or not hits(deny)


def entry(body: str):
    result = check_document("p.toml", f'[units."u.service"]\n{body}')
    assert not result.errors, result.errors
    return result.entries[0]


def toml_list(words):
    return "[" + ", ".join(f'"{w}"' for w in words) + "]"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(WORDS), max_size=4), st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
       st.lists(S.packets(), min_size=6, max_size=6), st.sampled_from(["ingress", "egress"]))
def test_exactly_systemds_rule(allow, deny, packets, direction):
    e = entry(f"ip_address_allow = {toml_list(allow)}\nip_address_deny = {toml_list(deny)}\n")
    text = getattr(e, direction)  # the lists apply to both directions
    expr = analyze(text).expr
    for data in packets:
        fields = parse_packet(data)
        remote = fields.saddr if direction == "ingress" else fields.daddr  # systemd: source in, destination out
        assert evaluate(expr, fields, direction) == systemd_verdict(remote, allow, deny), (text, fields)


def test_both_filters_must_pass_and_a_direction_without_its_own_gets_the_lists():
    e = entry('ip_address_allow = ["10.0.0.0/8"]\nip_address_deny = ["any"]\ningress = "udp && local_port == 53"\n')
    assert e.ingress == "(remote_addr in 10.0.0.0/8) && (udp && local_port == 53)"
    assert e.egress == "remote_addr in 10.0.0.0/8"
    dns_from = {a: parse_packet(S.pk.ipv4(a, "192.168.1.1", S.pk.UDP, S.pk.udp(5353, 53))) for a in ("10.0.0.2", "11.0.0.1")}
    verdicts = {a: evaluate(analyze(e.ingress).expr, f, "ingress") for a, f in dns_from.items()}
    assert verdicts == {"10.0.0.2": True, "11.0.0.1": False}


@pytest.mark.parametrize("body,message", [
    ('ip_address_allow = ["10.0.0.0/8"]\n',
     'units."u.service": ip_address_allow alone lets every packet pass (as IPAddressAllow= without IPAddressDeny= '
     'does); add ip_address_deny (e.g. ["any"]), ingress or egress'),
    ('ip_address_deny = ["10.0.0.0/33"]\n', "units.\"u.service\".ip_address_deny: '10.0.0.0/33' is not an address"),
    ('ip_address_deny = "any"\n', 'units."u.service".ip_address_deny: expected an array of strings'),
    ('ip_address_deny = [1]\n', 'units."u.service".ip_address_deny: expected an array of strings'),
])
def test_bad_lists(body, message):
    result = check_document("p.toml", f'[units."u.service"]\n{body}')
    assert result.entries == [] and result.errors[0].startswith("p.toml:") and message in result.errors[0]


def test_prefixes_take_systemds_spelling():
    # several words in one item, host bits masked (as systemd does), a pair of networks that
    # makes a name written as the name, sorted (systemd shows a set)
    assert prefixes(["fd00::/8 10.1.2.3/8", "::1/128 127.0.0.0/8", "192.0.2.1"]) == \
        ["localhost", "10.0.0.0/8", "192.0.2.1", "fd00::/8"]
    assert prefixes(["0.0.0.0/0 ::/0"]) == ["any"]
    assert prefixes(["0.0.0.0/0"]) == ["0.0.0.0/0"]


def test_restrict_network_interfaces():
    assert interface_filter(["wg0", "eth0"]) == 'ifname in {"eth0", "wg0"}'
    assert interface_filter(["~wlan0"]) == '!(ifname in {"wlan0"})'
    assert interface_filter(["~", "wlan0"]) == '!(ifname in {"wlan0"})'
    assert interface_filter([]) is None and interface_filter(["~"]) is None
    lo, wg = (replace(parse_packet(S.pk.ipv4("10.0.0.1", "10.0.0.2", S.pk.UDP, S.pk.udp(1, 2))), ifname=n)
              for n in ("lo", "wg0"))
    expr = analyze(interface_filter(["~lo"])).expr
    assert (evaluate(expr, lo, "egress"), evaluate(expr, wg, "egress")) == (False, True)


def test_entry_toml_round_trips_through_the_policy():
    props = parse_show("LoadState=loaded\nIPAddressAllow=::1/128 127.0.0.0/8\nIPAddressDeny=0.0.0.0/0 ::/0\n"
                       "RestrictNetworkInterfaces=wg0\nOther=x\n")
    text = entry_toml("u.service", props)
    result = check_document("p.toml", text)
    assert not result.errors
    e = result.entries[0]
    assert e.ingress == '(remote_addr in localhost) && (ifname in {"wg0"})' == e.egress
