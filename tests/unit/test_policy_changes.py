"""`policy check`'s warnings, on policies and cgroup trees written out (no kernel)."""
from __future__ import annotations

import pytest

from bpfwall.lang.checker import analyze_pair
from bpfwall.policy import Entry, Policy
from bpfwall.policy.changes import drops_everything, may_name_slices, warnings
from bpfwall.policy.tree import Cgroup


def entry(name, ingress=None, egress="true", cgroup=None, line=1, mode="enforce") -> Entry:
    return Entry(name=name, ingress=ingress, egress=egress, params={}, sets={}, mode=mode, backend="bpf",
                 set_capacity=16, cgroup=cgroup, file="p.toml", line=line, checked=analyze_pair(ingress, egress))


def tree(*specs) -> list[Cgroup]:
    """'path' or 'path*' (processes run there)."""
    return [Cgroup(s.rstrip("*"), "/cg/" + s.rstrip("*"), s.endswith("*")) for s in ("",) + specs]


@pytest.mark.parametrize("name, cgroup, names", [
    ("*", None, True), ("*.s*", None, True), ("*e", None, True), ("*.service", None, False),
    ("nginx.service", None, False), ("system.slice", None, False),   # a slice default is no glob of units
    ("*", "system.slice/*", True), ("*", "user@*.service/app.slice/*.scope", False), ("*", "**", True),
])
def test_which_entries_of_units_could_name_a_slice(name, cgroup, names):
    assert may_name_slices(entry(name, cgroup=cgroup)) is names


def test_drops_everything_only_when_proved_and_enforced():
    assert drops_everything(entry("a.slice", egress="false"), "egress")
    assert drops_everything(entry("a.slice", egress="tcp && !true"), "egress")
    assert not drops_everything(entry("a.slice", egress="tcp && udp"), "egress")  # never true, not proved
    assert not drops_everything(entry("a.slice", egress="false"), "ingress")      # left out: not filtered
    assert not drops_everything(entry("a.slice", egress="false", mode="audit"), "egress")


def test_the_issue_policy_warns_about_the_glob_and_names_what_it_policed():
    star, postfix = entry("*", egress="!(remote_addr in 127.0.0.0/8)", line=1), entry("postfix.service", line=4)
    policy = Policy([star, postfix])
    got = warnings(policy, tree("system.slice", "system.slice/postfix.service", "user.slice", "init.scope"))
    assert got == ["p.toml:1: warning: units.\"*\": names units only now, never a slice (only an entry whose name ends "
                   "in .slice is a slice default), though '*' matches slice names; it used to police system.slice, "
                   "user.slice, which it no longer polices"]
    assert warnings(policy, None)[0].endswith("; no cgroup tree here to say which slices it policed")
    assert warnings(policy, tree("init.scope"))[0].endswith("; it policed no slice that exists here")


def test_a_deny_all_default_names_the_running_units_it_cuts_off():
    policy = Policy([entry("system.slice", egress="false", line=1), entry("postfix.service", line=4),
                     entry("cron.service", ingress="tcp", egress=None, line=7)])
    got = warnings(policy, tree("system.slice*", "system.slice/postfix.service*", "system.slice/sshd.service*",
                                "system.slice/sshd.service/sub*", "system.slice/idle.service",
                                "system.slice/cron.service*"))
    assert got[0].startswith("p.toml:1: warning: units.\"system.slice\": a slice default now")
    # postfix has its own egress; idle runs nothing; cron's entry leaves egress to the default
    assert got[1:] == ["p.toml:1: warning: units.\"system.slice\": the egress default drops every packet, and "
                       "system.slice holds 2 running units without an entry of their own for egress, which it cuts "
                       "off: cron.service, sshd.service"]
