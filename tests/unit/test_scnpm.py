"""import-scnpm: scnpm comment rules → bpfwall policy; first-match order, defaults, what cannot be translated."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import textwrap
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bpfwall import cli
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.policy import load_policy
from bpfwall.policy.schema import check_document
from bpfwall.scnpm import ScnpmError, import_text
from bpfwall.scnpm.ruleset import Ruleset, scnpm_rules
from tests.strategies import packets
from tests.unit.scnpm_model import UNIT, nft_match, nft_passes, render, rulesets

DATA = pathlib.Path(__file__).parent / "data" / "scnpm"
# The example of systemd-cgroup-nftables-policy-manager's README, verbatim.
README = (DATA / "scnpm-readme.conf").read_text()
# The same rules with the base chain declared and the interface matches taken out: loadable by nft.
WHITELIST = (DATA / "whitelist.conf").read_text()
# The issue's example: an unconditional jump, then a drop in the calling chain.
JUMP_THEN_DROP = (DATA / "jump-then-drop.conf").read_text()


def sent(raw_packets) -> list:
    """Parsed packets, each with the device it leaves by."""
    return [dataclasses.replace(parse_packet(data), ifname=dev) for data, dev in raw_packets]


DEVICES = st.sampled_from(["sa", "my-vpn", "lo", "eth0", "wg0"])


def imported(text: str, **kw):
    result = import_text(textwrap.dedent(text), "nft.conf", **kw)
    assert check_document("out.toml", result.toml).errors == []  # every output passes the policy checker
    units = tomllib.loads(result.toml).get("units", {})
    for body in units.values():  # long expressions are written over several lines
        for direction in ("ingress", "egress"):
            if direction in body:
                body[direction] = analyze(body[direction]).text
    return result, units


def problems(text: str, **kw) -> list[str]:
    return [f"{p.line}: {p.why}" for p in imported(text, **kw)[0].problems]


@settings(max_examples=20, deadline=None)
@given(raw_packets=st.lists(st.tuples(packets(), DEVICES), min_size=40, max_size=40))
def test_readme_example(raw_packets):
    """A packet leaving by my-vpn goes through the whitelist and, if it does not accept it, comes
    back to the reject; iifname on the output hook never matches (a sent packet has no input
    device); every other packet passes."""
    result, units = imported(README)
    assert [p.why for p in result.problems] == []
    assert set(units) == {"postfix.service", "app-mail.scope"}
    assert units["postfix.service"]["cgroup"] == "system.slice/postfix.service"
    assert "# note: line 13: reject became drop" in result.toml
    for unit, ports in (("postfix.service", "{25}"), ("app-mail.scope", "{25, 143}")):
        got = analyze(units[unit]["egress"]).expr
        want = analyze(f'!(ifname == "my-vpn") || tcp && dst_port in {ports}').expr
        for fields in sent(raw_packets):
            assert evaluate(got, fields, "egress", {}, {}) == evaluate(want, fields, "egress", {}, {}), \
                (units[unit]["egress"], fields)


def test_whitelist_falls_back_to_the_reject_after_the_jump():
    result, units = imported(WHITELIST)
    assert result.problems == []
    assert units == {
        "postfix.service": {"cgroup": "system.slice/postfix.service", "egress": "tcp && dst_port == 25"},
        "app-mail.scope": {"cgroup": "user.slice/user-1000.slice/user@1000.service/app.slice/app-mail.scope",
                           "egress": "tcp && dst_port in {25, 143}"},
    }
    assert "# egress: what nft decides for the unit's packets, through inet filter output (hook output, " \
           "priority 0, policy accept)" in result.toml
    assert "reject became drop" in result.toml


def test_jump_returns_to_the_drop_after_it():
    """The issue's example: the whitelist chain ends without a verdict, so the packet comes back to
    the drop after the jump (the importer said `true` here)."""
    result, units = imported(JUMP_THEN_DROP)
    assert result.problems == []
    assert units == {"postfix.service": {"cgroup": "system.slice/postfix.service",
                                         "egress": "tcp && dst_port == 25"}}


@pytest.mark.parametrize("chains, egress", [
    # goto does not come back: the base chain's policy decides when the goto'd chain ends
    ("chain o { type filter hook output priority 0; goto w; drop }", "true"),
    ("chain o { type filter hook output priority 0; policy drop; goto w; accept }", "tcp && dst_port == 80"),
    # return in the jumped-to chain: back to the caller
    ("chain o { type filter hook output priority 0; jump w; udp dport 53 accept; drop }\n"
     "  chain w { tcp dport 22 return }", "tcp && dst_port == 80 || udp && dst_port == 53"),
    # return in a base chain: its policy
    ("chain o { type filter hook output priority 0; policy drop; udp dport 53 return; jump w; accept }",
     "!(udp && dst_port == 53)"),
    # jumps nest; each return goes one chain back
    ("chain o { type filter hook output priority 0; jump x; meta l4proto udp accept; drop }\n"
     "  chain x { jump w; tcp dport 22 accept; return; drop }", "tcp && dst_port in {22, 80} || udp"),
    # an accept in one base chain does not stop the next; a drop in any does
    ("chain o { type filter hook output priority 0; jump w; accept }\n"
     "  chain p { type filter hook output priority 10; tcp dport 20-60 drop }", "!(tcp && dst_port in 20..60)"),
    ("chain o { type filter hook output priority 0; jump w; drop }\n"
     "  chain p { type filter hook postrouting priority 0; policy drop; udp dport 1 accept }", "false"),
    # input chains do not judge sent packets
    ("chain o { type filter hook output priority 0; jump w; drop }\n"
     "  chain i { type filter hook input priority 0; policy drop; }", "tcp && dst_port == 80"),
    # a rule for another cgroup never matches the unit's packets; one for its slice does
    ("chain o { type filter hook output priority 0; socket cgroupv2 level 1 \"user.slice\" drop; jump w; drop }",
     "tcp && dst_port == 80"),
    ("chain o { type filter hook output priority 0; socket cgroupv2 level 1 \"system.slice\" udp dport 53 drop;"
     " jump w; accept }", "!(udp && dst_port == 53)"),
    # continue and rules without a verdict decide nothing
    ("chain o { type filter hook output priority 0; policy drop; meta l4proto udp continue; counter; jump w; }",
     "tcp && dst_port == 80"),
])
@settings(max_examples=10, deadline=None)
@given(raw_packets=st.lists(packets(), min_size=40, max_size=40))
def test_control_flow(chains, egress, raw_packets):
    _, units = imported(f"""
        table inet f {{
          {chains}
          chain w {{ }}
        }}
        # a.service :: add rule inet f w socket cgroupv2 level 2 "system.slice/a.service" tcp dport 80 accept
    """)
    got, want = analyze(units["a.service"]["egress"]).expr, analyze(egress).expr
    for fields in map(parse_packet, raw_packets):
        assert evaluate(got, fields, "egress", {}, {}) == evaluate(want, fields, "egress", {}, {}), \
            (units["a.service"]["egress"], fields)


def test_a_table_of_one_family_does_not_judge_the_other():
    _, units = imported("""
        table ip f { chain o { type filter hook output priority 0; policy drop; } }
        # a.service :: add rule ip f o tcp dport 25 accept
    """)
    assert units["a.service"]["egress"] == analyze("!ip || ip && tcp && dst_port == 25").text


@pytest.mark.parametrize("chains, line, why", [
    ("chain o { type filter hook output priority 0; ct state established accept; jump w; }", 3,
     "ct (connection tracking) is not in bpfwall's language: it judges each packet on its own"),
    ("chain o { type filter hook output priority 0; jump w; jump nowhere; }", 3,
     "jump to nowhere: table inet f has no such chain"),
    ("chain o { type nat hook output priority 0; jump w; }", 3,
     "inet f o is a nat chain: it sees a connection's first packet only, which bpfwall cannot tell apart"),
])
def test_what_the_unit_packets_reach_must_translate(chains, line, why):
    result, units = imported(f"""
        table inet f {{
          {chains}
          chain w {{ }}
        }}
        # a.service :: add rule inet f w tcp dport 25 accept
    """)
    assert units == {}
    assert [(p.line, p.why) for p in result.problems][:1] == [
        (line, f"{why} (on the path of a.service's egress packets)")]


def test_chain_policy_is_the_default_and_rule_order_decides():
    _, units = imported("""
        table inet fw {
          chain in { type filter hook input priority 0; policy drop; }
          chain out { type filter hook output priority 0; policy accept; }
        }
        # web.service :: add rule inet fw in tcp dport { http, https } accept
        # web.service :: add rule inet fw in ip saddr 10.0.0.0/8 drop
        # web.service :: add rule inet fw in ip saddr 10.0.0.0/8 tcp dport 22 accept
        # web.service :: add rule inet fw out ip daddr 192.168.0.0/16 drop
        # web.service :: add rule inet fw out udp dport 53 accept
    """)
    assert units["web.service"] == {
        # the third rule can never decide (the second drops all of 10/8 first), and says so by its shape
        "ingress": "tcp && dst_port in {80, 443} || !(ip && saddr in 10.0.0.0/8) && "
                   "ip && saddr in 10.0.0.0/8 && tcp && dst_port == 22",
        "egress": "!(ip && daddr in 192.168.0.0/16)",
    }


def test_flat_commands_named_sets_defines_and_families():
    result, units = imported("""
        add table ip6 t6
        add chain ip6 t6 out { type filter hook output priority 0 ; policy drop ; }
        add set ip6 t6 peers { type ipv6_addr ; flags interval ; }
        add element ip6 t6 peers { 2001:db8::/32, fd00::1 }
        add table ip t4
        add chain ip t4 in { type filter hook input priority 0 ; }
        add chain ip t4 helper
        add rule ip t4 in jump helper
        define ports = { 22, 8000-8100 }
        # a.service :: add rule ip6 t6 out ip6 daddr @peers accept
        # a.service :: add rule ip6 t6 out icmpv6 type { echo-request, nd-neighbor-solicit } accept
        # b.service :: add rule ip t4 helper tcp dport $ports counter log prefix "b " accept
        # b.service :: add rule ip t4 helper ip saddr 10.0.0.1-10.0.0.6 reject with tcp reset
        # b.service :: add rule ip t4 helper meta l4proto icmp icmp type != echo-request accept
        # b.service :: add rule ip t4 helper tcp dport < 1024 meta length <= 1500 accept
    """, default="drop")
    assert result.problems == []
    assert units["a.service"] == {
        # the ip6 table does not see IPv4 packets: they pass
        "egress": "!ipv6 || ipv6 && daddr in @peers || ipv6 && icmp && icmp_type in {128, 135}",
        "sets": {"peers": ["2001:db8::/32", "fd00::1/128"]},
    }
    ingress = units["b.service"]["ingress"]
    assert "dst_port in {22, 8000..8100}" in ingress
    assert "!(ip && saddr in {10.0.0.1, 10.0.0.2/31, 10.0.0.4/31, 10.0.0.6})" in ingress
    assert "ip && icmp && ip && icmp && !(icmp_type == 8)" in ingress and "len <= 1500" in ingress
    assert "reject became drop: bpfwall drops without an ICMP error or TCP reset" in result.toml
    assert "# ingress: what nft decides for the unit's packets, through ip t4 in (hook input, priority 0, " \
           "policy drop)" in result.toml


def test_named_set_without_elements_is_empty_and_noted():
    result, units = imported("""
        # a.service :: add rule inet f output ip daddr @my-hosts accept
        # a.service :: add rule inet f output tcp dport @my-hosts accept
    """, default="drop")
    assert [f"{p.line}: {p.why}" for p in result.problems] == [
        "3: set @my-hosts is used as two kinds of set, or two sets share the name @my_hosts"]
    assert units == {"a.service": {"egress": "ip && daddr in @my_hosts", "sets": {"my_hosts": []}}}
    result, units = imported("# a.service :: add rule inet f output ip daddr @my-hosts accept\n", default="drop")
    assert units["a.service"] == {"egress": "ip && daddr in @my_hosts", "sets": {"my_hosts": []}}
    assert "set @my_hosts (nft set my-hosts) has no elements in the file: fill it with " \
           "bpfwall set a.service @my_hosts=…" in result.toml


def test_declared_set_elements_are_translated():
    result, units = imported("""
        table inet f {
          set ports { type inet_service; flags interval; elements = { ssh, 8000-8100, 0x50 } }
          set bad { type ipv4_addr; elements = { example.com } }
        }
        # a.service :: add rule inet f input socket cgroupv2 level 1 "a.service" tcp dport @ports accept
        # b.service :: add rule inet f input socket cgroupv2 level 1 "b.service" ip saddr @bad accept
    """, default="drop")
    assert units == {"a.service": {"ingress": "tcp && dst_port in @ports", "sets": {"ports": ["22", "8000..8100", "80"]}}}
    assert [f"{p.line}: {p.why}" for p in result.problems] == [
        "7: 'example.com' is not an address, a network or an address range"]


def test_another_units_rule_that_can_match_refuses_the_unit():
    """scnpm adds each unit's rules when the unit starts: a rule of another unit that can match
    (no cgroup match, or the unit's slice) stands before or after the unit's rules, as it happens."""
    result, units = imported("""
        table inet f { chain input { type filter hook input priority 0; } }
        # a.service :: add rule inet f input socket cgroupv2 level 2 "system.slice/a.service" tcp dport 22 drop
        # system.slice :: add rule inet f input socket cgroupv2 level 1 "system.slice" tcp dport 23 drop
        # c.service :: add rule inet f input socket cgroupv2 level 2 "user.slice/c.service" tcp dport 24 drop
    """)
    assert set(units) == {"system.slice", "c.service"}
    assert [f"{p.line}: {p.why}" for p in result.problems] == [
        "4: this rule of system.slice can match a.service's packets too, and where it stands among a.service's "
        "rules depends on which unit scnpm started first (on the path of a.service's ingress packets)"]


def test_hook_option_and_chain_names():
    assert problems("# a.service :: add rule inet f whitelist tcp dport 1 accept\n") == [
        "1: cannot tell which hook chain inet f whitelist is on (the file declares no base chain that reaches it); "
        "give --hook whitelist=input or --hook whitelist=output"]
    _, units = imported("# a.service :: add rule inet f whitelist tcp dport 1 accept\n",
                        hooks=["whitelist=input"], default="drop")
    assert units["a.service"] == {"ingress": "tcp && dst_port == 1"}
    result, units = imported("# a.service :: add rule inet f output tcp dport 1 accept\n", default="drop")
    assert units["a.service"] == {"egress": "tcp && dst_port == 1"}
    assert "through inet f output (hook output, priority 0, policy drop; not declared in the file; taken by its " \
           "name)" in result.toml
    with pytest.raises(ScnpmError, match="--hook x=forward: write CHAIN=input or CHAIN=output"):
        import_text("# a.service :: add rule inet f x accept\n", hooks=["x=forward"])


@pytest.mark.parametrize("rule, why", [
    ("inet f input ct state established accept",
     "ct (connection tracking) is not in bpfwall's language: it judges each packet on its own"),
    ("inet f input iif lo accept", "interfaces by index (iif) are not in bpfwall's language; iifname is"),
    ("inet f input iifname \"a/b\" accept",
     '"a/b" is not an interface name (no \'/\': letters, digits and . - _ @ …)'),
    ("inet f input meta mark 1 accept", "packet marks are not in bpfwall's language"),
    ("inet f input th dport 53 accept",
     "th (any transport header) is not in bpfwall's language; write tcp dport … or udp dport …"),
    ("inet f input tcp flags syn accept", "TCP flags and options are not in bpfwall's language"),
    ("inet f input jump other", "jump to other: table inet f has no such chain (on the path of a.service's "
                                "ingress packets)"),
    ("inet f input meta l4proto tcp tcp dport vmap { 22 : accept }",
     "verdict maps are not followed (write one rule per element)"),
    ("inet f input meta l4proto sctp accept", "protocol sctp: bpfwall knows tcp, udp, icmp and icmpv6 only"),
    ("inet f input ip6 nexthdr tcp accept",
     "ip6 nexthdr is the first next header; bpfwall matches the final one (write meta l4proto)"),
    ("inet f input ip saddr . tcp dport { 10.0.0.1 . 22 } accept",
     "concatenations (a . b) are not in bpfwall's language"),
    ("inet f input ip saddr $nope accept", "$nope is not defined in the file"),
    ("inet f input ip saddr example.com accept", "'example.com' is not an address, a network or an address range"),
    ("inet f input ip saddr fd00::1 accept", "fd00::1 is an IPv6 address in an ip match"),
    ("inet f input ip saddr < 10.0.0.1 accept", "addresses have no order in bpfwall's language"),
    ("inet f input tcp dport nosuchservice accept", "'nosuchservice' is not a value bpfwall knows"),
    ("inet f input tcp dport 70000 accept", "70000 is out of range (0..65535)"),
    ("inet f input tcp dport 90-80 accept", "empty range 90-80"),
    ("inet f input accept tcp", "'tcp' after the verdict"),
    ("inet f input tcp dport", "the rule ends too early"),
    ("inet f input limit rate 10/second accept", "rate limits are not in bpfwall's language"),
    ("bridge f input accept", "family bridge: bpfwall filters IP traffic of sockets (ip, ip6, inet tables)"),
    ("inet f forward accept", "chain inet f forward is on hook forward; a unit's own traffic is seen on the "
                              "prerouting, input, output and postrouting hooks only"),
    ("filter input accept", "expected FAMILY TABLE CHAIN after '::' (e.g. inet filter output)"),
    ('inet f input socket cgroupv2 level 3 "system.slice/a.service" accept',
     "socket cgroupv2 level 3 with a path of 2 components never matches"),
    ('inet f input socket cgroupv2 level 1 "system.slice" accept',
     "the cgroup system.slice is not the unit's own (a.service); bpfwall attaches a unit's filter to the "
     "unit's cgroup"),
])
def test_untranslatable_rules_say_why(rule, why):
    decl = "table inet f { chain forward { type filter hook forward priority 0; } }\n"
    assert problems(decl + f"# a.service :: add rule {rule}\n") == [f"2: {why}"]


def test_problems_in_context():
    text = """
        # a.service :: add rule inet f input tcp dport 1 accept
        # a.service :: add rule inet f in2 tcp dport 2 accept
        # a.service :: add rule inet f input socket cgroupv2 level 2 "system.slice/a.service" accept
        # a.service :: add rule inet f input socket cgroupv2 level 2 "other.slice/a.service" accept
        # x.target :: add rule inet f input socket cgroupv2 level 1 "x.target" accept
        # a.service :: insert rule inet f input accept
        # b.service :: add rule inet f input \\
        not a comment
    """
    assert problems(text, hooks=["in2=input"]) == [
        "5: a.service already has rules for cgroup system.slice/a.service (line 4)",
        "6: x.target has no cgroup of its own that bpfwall polices (units ending in .service, .scope, .slice, "
        ".socket, .mount, .swap)",
        "7: insert puts the rule before the others; only 'add rule' keeps a known order",
        "8: the rule ends in '\\' but the next line is not a comment that continues it",
    ]


def test_rules_left_out_are_marked():
    result, units = imported("""
        # a.service :: add rule inet f input tcp dport 22 accept
        # a.service :: add rule inet f input ct state new drop
    """, default="drop")
    assert units["a.service"] == {"ingress": "tcp && dst_port == 22"}
    assert "# nft.conf:3: inet f input ct state new drop  (NOT TRANSLATED)" in result.toml
    assert "#   nft.conf:3: ct (connection tracking) is not in bpfwall's language" in result.toml


def test_no_scnpm_rules_is_an_error():
    with pytest.raises(ScnpmError, match=r"x.conf: no scnpm rules in it"):
        import_text("table inet f { }\n# just a comment\n", "x.conf")


def test_scnpm_comment_format():
    rules, broken = scnpm_rules(textwrap.dedent("""
        ## a plain comment :: with colons
        # a.service :: add rule inet f input accept
        ### b.scope ::   inet f output \\
        ##   tcp dport 1 \\
        #   accept
        # c.slice :: add inet f input drop
        #not-a-rule.service:: add rule x
    """))
    assert broken == []
    assert [(r.line, r.unit, r.text) for r in rules] == [
        (3, "a.service", "inet f input accept"),
        (4, "b.scope", "inet f output tcp dport 1 accept"),
        (7, "c.slice", "inet f input drop"),
    ]


def test_ruleset_reader():
    rs = Ruleset(textwrap.dedent("""
        table inet f {   # a comment { with braces
          map m { type ipv4_addr : verdict; elements = { 10.0.0.1 : jump a } }
          chain input { type filter hook input priority filter; policy drop;
            tcp dport { 22,
                        80 } jump a
          }
          chain a { goto b; }
          chain b { }
          set s { type inet_service; elements = { 22, 80-90, } }
        }
        add chain inet f out { type filter hook output priority 0; }
    """))
    assert rs.chain("inet", "f", "input").hook == "input" and rs.chain("inet", "f", "input").policy == "drop"
    assert rs.chain("inet", "f", "input").jumps == {"a"} and rs.chain("inet", "f", "a").jumps == {"b"}
    assert rs.base_chains_reaching("inet", "f", "b") == ["input"]
    assert rs.base_chains_reaching("inet", "f", "out") == ["out"]
    assert rs.sets[("inet", "f", "s")] == ["22", "80-90"]


# -- the translation means what the rules mean --------------------------------

@st.composite
def rule_lists(draw):
    rules = []
    for _ in range(draw(st.integers(1, 5))):
        matches = draw(st.lists(nft_match(direction="ingress"), max_size=3))
        verdict = draw(st.sampled_from(["accept", "drop", "reject"]))
        rules.append((" ".join(m for m, _ in matches) + " " + verdict, [p for _, p in matches],
                      verdict == "accept"))
    return rules


@settings(max_examples=150, deadline=None)
@given(rule_lists(), st.sampled_from(["accept", "drop"]), st.lists(packets(), min_size=8, max_size=8))
def test_first_matching_rule_decides_like_nft(rules, policy, raw_packets):
    text = f"table inet f {{ chain input {{ type filter hook input priority 0; policy {policy}; }} }}\n"
    text += "".join(f"# a.service :: add rule inet f input {r}\n" for r, _, _ in rules)
    result, units = imported(text)
    assert result.problems == []
    expr = analyze(units["a.service"]["ingress"]).expr
    for data in raw_packets:
        fields = parse_packet(data)
        expected = policy == "accept"
        for _, predicates, accept in rules:
            if all(p(fields) for p in predicates):
                expected = accept
                break
        assert evaluate(expr, fields, "ingress", {}, {}) == expected, (text, fields)


@settings(max_examples=400, deadline=None)
@given(rulesets(), st.booleans(), st.lists(st.tuples(packets(), DEVICES), min_size=10, max_size=10))
def test_translation_decides_as_the_nft_model(tables, flat, raw_packets):
    """Random rulesets of several tables, base chains and regular chains, with jumps, gotos,
    returns, rules for the unit's cgroup, for another's and for none: the imported expression
    decides every packet as the model of nft's evaluation (scnpm_model.py) does."""
    text = render(tables, flat)
    result, units = imported(text)
    # A unit rule in a chain no base chain reaches is reported and decides nothing, in nft too.
    assert all(p.why.startswith("cannot tell which hook chain") for p in result.problems), (text, result.problems)
    expr = analyze(units[UNIT]["egress"]).expr
    for fields in sent(raw_packets):
        expected = nft_passes(tables, ("output", "postrouting"), fields)
        assert evaluate(expr, fields, "egress", {}, {}) == expected, (text, units[UNIT]["egress"], fields)


# -- the command --------------------------------------------------------------

def run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # commands that report several errors exit by themselves
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_exit_status_and_partial(tmp_path, trusted_tmp_path, capsys):
    conf = tmp_path / "nftables.conf"
    conf.write_text(WHITELIST + "# postfix.service :: add rule inet filter vpn.whitelist socket cgroupv2 level 2 "
                    "\"system.slice/postfix.service\" ct state new accept\n")
    code, out, err = run(capsys, "import-scnpm", str(conf))
    assert code == 2
    assert err == f"{conf}:17: cannot translate: ct (connection tracking) is not in bpfwall's language: " \
                  "it judges each packet on its own\n"
    policy_file = trusted_tmp_path / "imported.toml"
    policy_file.write_text(out)
    assert [e.name for e in load_policy(files=[str(policy_file)]).entries] == ["postfix.service", "app-mail.scope"]
    code, out2, _ = run(capsys, "import-scnpm", str(conf), "--partial")
    assert (code, out2) == (0, out)
    code, out, _ = run(capsys, "import-scnpm", str(conf), "--json", "--partial")
    data = json.loads(out)
    assert code == 0 and data["problems"][0]["line"] == 17 and "[units.\"postfix.service\"]" in data["toml"]
    assert data["units"][1]["name"] == "app-mail.scope"
    assert data["units"][1]["egress_chains"] == ["inet filter output"]


def test_cli_refuses_a_rule_on_the_way_naming_the_line(tmp_path, capsys):
    conf = tmp_path / "nftables.conf"
    conf.write_text(README.replace("oifname my-vpn jump", "oif 3 jump"))
    code, out, err = run(capsys, "import-scnpm", str(conf))
    assert code == 2 and "[units." not in out
    assert err.splitlines()[0] == f"{conf}:12: cannot translate: interfaces by index (oif) are not in bpfwall's " \
                                  "language; oifname is (on the path of postfix.service's egress packets)"


def test_cli_errors(tmp_path, capsys):
    code, _, err = run(capsys, "import-scnpm", str(tmp_path / "missing.conf"))
    assert code == 2 and err == f"bpfwall: error: {tmp_path}/missing.conf: cannot read: No such file or directory\n"


# -- whatever the input, the output passes `bpfwall policy check` ----------------

_SET_ELEMENTS = {
    "number": ["22", "80-88", "0-65535", "1-65535", "1000-9999", "http", "0-16777215", "0-16777216", "443"],
    "address": ["10.0.0.0/8", "10.0.0.1", "192.168.0.0/16", "10.0.0.1-10.0.3.7", "2001:db8::/32", "::1"],
}
_SET_USES = {"number": ["tcp dport", "udp sport", "meta length"], "address": ["ip saddr", "ip6 daddr"]}


@st.composite
def scnpm_files(draw):
    """An nftables.conf with named sets (some larger than the default set_capacity, one larger than any
    bpfwall set can be) and scnpm rules that use them in every way: with and without a verdict, shadowed
    by an earlier rule, in both directions, next to matches bpfwall has no counterpart for."""
    sets = {}
    for i in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["number", "address"]))
        elements = draw(st.lists(st.sampled_from(_SET_ELEMENTS[kind]), max_size=3, unique=True))
        sets[f"s{i}-{kind[0]}"] = (kind, elements)
    declared = "".join(f"  set {name} {{ type x; flags interval; "
                       + (f"elements = {{ {', '.join(elements)} }} " if elements else "") + "}\n"
                       for name, (kind, elements) in sets.items())
    policies = [draw(st.sampled_from(["", " policy accept;", " policy drop;"])) for _ in range(2)]
    text = (f"table inet f {{\n{declared}"
            f"  chain input {{ type filter hook input priority 0;{policies[0]} }}\n"
            f"  chain output {{ type filter hook output priority 0;{policies[1]} }}\n}}\n")
    matches = ["tcp dport 22", "udp dport { 53, 5353 }", "ip saddr 10.0.0.0/8", "meta l4proto icmp",
               "tcp dport 1000-2000", "counter", "ct state new", "socket cgroupv2 level 2 \"system.slice/a.service\"",
               "socket cgroupv2 level 1 \"b.service\""]
    matches += [f"{use} @{name}" for name, (kind, _) in sets.items() for use in _SET_USES[kind]]
    for _ in range(draw(st.integers(1, 8))):
        unit = draw(st.sampled_from(["a.service", "b.service", "c.scope"]))
        chain = draw(st.sampled_from(["input", "output"]))
        rule = " ".join(draw(st.lists(st.sampled_from(matches), max_size=3)))
        verdict = draw(st.sampled_from(["accept", "drop", "reject", "", "counter"]))
        text += f"# {unit} :: add rule inet f {chain} {rule} {verdict}\n"
    return text


@settings(max_examples=300, deadline=None)
@given(scnpm_files(), st.sampled_from([None, "accept", "drop"]))
def test_imported_policy_always_passes_policy_check(text, default):
    result = import_text(text, "nft.conf", default=default)
    assert check_document("imported.toml", result.toml).errors == []
    for problem in result.problems:  # what is left out is reported, and never as a bug of the importer
        assert "internal error" not in problem.why, (text, problem)
    assert set(tomllib.loads(result.toml).get("units", {})) == {u["name"] for u in result.units}


def test_a_set_over_the_default_capacity_raises_the_entrys_capacity():
    result, units = imported("""
        table inet f {
          set all { type inet_service; flags interval; elements = { 0-65535 } }
          set huge { type integer; flags interval; elements = { 0-16777216 } }
          chain input { type filter hook input priority 0; policy drop; }
        }
        # a.service :: add rule inet f input socket cgroupv2 level 1 "a.service" tcp dport @all accept
        # b.service :: add rule inet f input socket cgroupv2 level 1 "b.service" meta length @huge accept
        """)
    assert units["a.service"]["set_capacity"] == 65536 and units["a.service"]["sets"] == {"all": ["0..65535"]}
    assert "# note: set_capacity raised from 4096 to 65536" in result.toml
    assert "b.service" not in units
    assert [f"{p.line}: {p.why}" for p in result.problems] == [
        "8: set @huge (nft set huge) holds 16777217 elements, more than a bpfwall set can (16777216)"]


def test_a_set_used_only_by_rules_that_decide_nothing_is_not_listed():
    _, units = imported("""
        table inet f {
          set s { type inet_service; elements = { 22 } }
          chain input { type filter hook input priority 0; policy accept; }
        }
        # a.service :: add rule inet f input socket cgroupv2 level 1 "a.service" tcp dport @s counter
        # b.service :: add rule inet f input socket cgroupv2 level 1 "b.service" tcp dport @s accept
        """)
    assert units == {"a.service": {"ingress": "true"}, "b.service": {"ingress": "true"}}


# -- the ruleset as nft holds it --------------------------------------------------

def test_flat_lines_flush_and_insert_build_the_chains_nft_holds():
    rs = Ruleset(textwrap.dedent("""\
        add table inet f
        add chain inet f o { type filter hook output priority filter + 5; policy drop; }
        add rule inet f o tcp dport 1 accept
        flush ruleset
        add table inet f
        add chain inet f o { type filter hook output priority -150; }
        add rule inet f o tcp dport 2 \\
          accept
        insert rule inet f o tcp dport 3 accept
        table inet f {
          chain o {
            tcp dport 4 accept
          }
        }
        add chain inet f x
        add rule inet f x drop
        flush chain inet f x
    """))
    o = rs.chain("inet", "f", "o")
    assert (o.hook, o.priority, o.policy) == ("output", -150, None)
    assert [(r.line, r.words) for r in o.rules] == [
        (9, ["tcp", "dport", "3", "accept"]), (7, ["tcp", "dport", "2", "accept"]), (12, ["tcp", "dport", "4", "accept"])]
    assert rs.chain("inet", "f", "x").rules == [] and rs.problems == []


def test_what_changes_a_ruleset_unseen_is_a_problem():
    _, problems = None, Ruleset(textwrap.dedent("""\
        include "/etc/nftables.d/*.conf"
        delete rule inet f o handle 4
        add rule inet f o position 3 accept
    """)).problems
    assert [line for line, _ in problems] == [1, 2, 3]
    assert "'include' changes the ruleset in a way the importer does not follow" in problems[0][1]
    assert "'delete rule'" in problems[1][1] and "a rule placed by position" in problems[2][1]


def test_a_translation_too_large_is_refused():
    """Each jump copies what follows it into every way out of the jumped-to chain."""
    chains = "".join(f"  chain j{k} {{ tcp dport {k} return; udp dport {k} accept; }}\n" for k in range(14))
    jumps = "; ".join(f"jump j{k}" for k in range(14))
    result, units = imported(f"""
        table inet f {{
          chain o {{ type filter hook output priority 0; {jumps}; drop; }}
{chains}        }}
        # a.service :: add rule inet f j0 meta l4proto icmp accept
    """)
    assert units == {}
    assert [p.why for p in result.problems] == [
        "the translation of a.service's packets through inet f o is too large (over 65536 characters or steps) "
        "(on the path of a.service's egress packets)"]


def test_many_jumps_that_fold_to_little_are_refused_quickly():
    """30 jumps whose chains return two ways: 2**30 ways through, all deciding the same."""
    chains = "".join(f"  chain j{k} {{ tcp dport {k} return; udp dport {k} return; meta length {k} drop; }}\n"
                     for k in range(30))
    jumps = "; ".join(f"jump j{k}" for k in range(30))
    result, units = imported(f"""
        table inet f {{
          chain o {{ type filter hook output priority 0; {jumps}; accept; }}
{chains}        }}
        # a.service :: add rule inet f j0 meta l4proto icmp accept
    """)
    assert units == {} and "is too large (over 65536 characters or steps)" in result.problems[0].why
