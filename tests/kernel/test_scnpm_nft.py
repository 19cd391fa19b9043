"""import-scnpm against real nft: each example ruleset is loaded into nft in a network namespace
of the test's own and real packets go through it from a real cgroup its `socket cgroupv2` rules
match; then the same packets go through the imported policy, loaded with the bpf backend and
attached to the same cgroup. Every packet must get the same verdict from both.

The unit's side lives in namespace A (where the ruleset is), the other side in namespace B,
joined by two veth pairs (one named my-vpn, as in scnpm's README example): nft judges only A's half of each exchange, as bpfwall judges only the
unit's, so a rule that drops everything else (the `drop` after the jump) does not also drop the
other side's answers. The examples' cgroup paths are moved under a cgroup subtree of the test's
own (`level N "P"` becomes `level N+1 "<subtree>/P"`) before both nft and the importer read them.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import subprocess
from contextlib import ExitStack
from pathlib import Path

import tomllib

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.kernel.cgroup import cgroup2_mount
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.policy import load_policy
from bpfwall.sandbox import TempCgroup
from bpfwall.scnpm import import_text
from bpfwall.scnpm.ruleset import scnpm_rules
from tests.kernel.netns import enter
from tests.kernel.realpackets import Exchange, NetNamespace, PacketSpec, compatible
from tests.unit.scnpm_model import PORTS as MODEL_PORTS
from tests.unit.scnpm_model import CGROUP, OTHER, UNIT, render, rulesets

pytestmark = [pytest.mark.kernel, pytest.mark.traffic]

DATA = Path(__file__).resolve().parents[1] / "unit" / "data" / "scnpm"
A4, A6 = "10.9.0.1", "fd09::1"                                  # the unit's side
B4, B6 = ["10.9.0.2", "10.9.0.3"], ["fd09::2", "fd09::3"]       # the other side
# More addresses of the other side, in the networks the random rulesets match
# (tests/unit/scnpm_model.py) but not on NetNamespace's loopback: one on the link's network,
# the others reached by a route.
B4_MORE, B6_MORE = ["10.77.0.1", "192.168.77.1"], ["2001:db8:77::1"]
ROUTES = {4: "192.168.77.0/24", 6: "2001:db8:77::/64"}
# A second link, named as in scnpm's README example: packets to its far ends leave by my-vpn.
VPN_A, VPN_B = ["10.66.0.1", "fd66::1"], ["10.66.0.2", "fd66::2"]
# scnpm's README example adds rules to a table and chain the rest of nftables.conf makes.
PREAMBLE = {"scnpm-readme.conf": "add table inet filter\n"
                                 "add chain inet filter output { type filter hook output priority 0; }\n"
                                 "add chain inet filter vpn.whitelist\n"}

EXAMPLES = int(os.environ.get("BPFWALL_SCNPM_EXAMPLES", "25"))
_verdicts = {True: 0, False: 0}
CLONE_NEWNS, MS_REC, MS_PRIVATE, MS_BIND = 0x20000, 0x4000, 0x40000, 0x1000


def _specs(direction: str) -> list[PacketSpec]:
    """TCP, UDP (and, sent, ICMP echo) packets of both families to the ports the examples name."""
    out = []
    for family, mine, theirs in ((4, A4, B4), (6, A6, B6)):
        wanted = [("tcp", p, 0) for p in (25, 80, 143, 443, 8080, 22)] + \
            [("udp", 53, 0), ("udp", 53, 1), ("udp", 5353, 0), ("udp", 25, 0)] if direction == "egress" else \
            [("tcp", p, 0) for p in (443, 2222, 5432, 9000, 80)] + [("udp", 53, 0), ("udp", 1234, 0)]
        for kind, dport, peer in wanted:
            src, dst = (mine, theirs[peer]) if direction == "egress" else (theirs[peer], mine)
            out.append(PacketSpec(kind, family, src, dst, 40000 + len(out), dport, payload=8 if kind == "udp" else 0))
        if direction == "egress":
            out.append(PacketSpec("ping", family, mine, theirs[0], icmp_type=8 if family == 4 else 128, payload=8))
            vpn_mine, vpn_theirs = VPN_A[family == 6], VPN_B[family == 6]
            out += [PacketSpec(kind, family, vpn_mine, vpn_theirs, 40000 + len(out) + k, dport,
                               payload=8 if kind == "udp" else 0)
                    for k, (kind, dport) in enumerate([("tcp", 25), ("tcp", 143), ("tcp", 80), ("udp", 25)])]
            out.append(PacketSpec("ping", family, vpn_mine, vpn_theirs, icmp_type=8 if family == 4 else 128,
                                  payload=8))
    return compatible(out)


def _relocate(text: str, top: str) -> str:
    return re.sub(r'socket cgroupv2 level (\d+) "([^"]*)"',
                  lambda m: f'socket cgroupv2 level {int(m[1]) + 1} "{top}/{m[2]}"', text)


def _nft_in(netns: str):
    """A preexec_fn: into `netns`, and in a mount namespace of its own with the cgroup2 mount on
    /sys/fs/cgroup, where nft looks up `socket cgroupv2` paths (a hybrid host mounts it elsewhere)."""
    def run():
        enter(netns)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0 or libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount namespace")
        mount = cgroup2_mount().encode()
        if mount != b"/sys/fs/cgroup" and libc.mount(mount, b"/sys/fs/cgroup", None, MS_BIND, None) != 0:
            raise OSError(ctypes.get_errno(), "bind mount")
    return run


def _nft(netns: str, text: str) -> None:
    r = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True, timeout=30,
                       preexec_fn=_nft_in(netns))
    assert r.returncode == 0, f"nft refused the example: {r.stderr}"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _link(a: NetNamespace, b: NetNamespace) -> None:
    """Two veth pairs between the namespaces (sa-sb, my-vpn-vb), addresses on both ends,
    neighbours known (no ARP/ND traffic for the rules to judge)."""
    ends = [("sa", "sb", [A4, A6], B4 + B4_MORE + B6 + B6_MORE), ("my-vpn", "vb", VPN_A, VPN_B)]
    for dev_a, dev_b, addrs_a, addrs_b in ends:
        _ip("-n", a.name, "link", "add", dev_a, "type", "veth", "peer", "name", dev_b, "netns", b.name)
        macs = {}
        for ns, dev, addrs in ((a, dev_a, addrs_a), (b, dev_b, addrs_b)):
            for addr in addrs:
                if ":" in addr:
                    _ip("-n", ns.name, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
                else:
                    _ip("-n", ns.name, "addr", "add", f"{addr}/{24 if addr.startswith(('192.', '10.66.')) else 8}",
                        "dev", dev)
            _ip("-n", ns.name, "link", "set", dev, "up")
            out = subprocess.run(["ip", "-n", ns.name, "-j", "link", "show", dev], capture_output=True, text=True,
                                 check=True).stdout
            macs[dev] = json.loads(out)[0]["address"]
        for ns, dev, peer, addrs in ((a, dev_a, dev_b, addrs_b), (b, dev_b, dev_a, addrs_a)):
            for addr in addrs:
                _ip("-n", ns.name, "neigh", "replace", addr, "lladdr", macs[peer], "dev", dev, "nud", "permanent")
    for route in ROUTES.values():
        _ip("-n", a.name, "route", "add", route, "dev", "sa")


def _fields(spec: PacketSpec, direction: str):
    """What the reference reads for the packet, with the device it crosses in namespace A."""
    peer = spec.daddr if direction == "egress" else spec.saddr
    return dataclasses.replace(spec.fields(), ifname="my-vpn" if peer in VPN_B else "sa")


def _cgroup(stack: ExitStack, path: str) -> TempCgroup:
    """The cgroup at `path` (under the cgroup2 mount) and its missing parents, removed by `stack`."""
    cg, parent = None, cgroup2_mount()
    for part in path.split("/"):
        if os.path.isdir(os.path.join(parent, part)):
            parent = os.path.join(parent, part)
            continue
        cg = stack.enter_context(TempCgroup(name=part, parent=parent))
        parent = cg.path
    assert cg is not None
    return cg


def _exchange(specs, direction, cg, other: NetNamespace) -> list[bool]:
    with Exchange(specs, direction, cg, outside=other.entered, rejects=True) as exchange:
        return exchange.run(settle=0.3)


@pytest.mark.parametrize("example, direction", [
    ("scnpm-readme.conf", "egress"), ("whitelist.conf", "egress"), ("jump-then-drop.conf", "egress"),
    ("egress-flow.conf", "egress"), ("ingress-flow.conf", "ingress")])
def test_real_nft_and_the_imported_policy_agree(example, direction, pin_root, trusted_tmp_path):
    specs = _specs(direction)
    with NetNamespace("bpfwall-test-scnpm") as near, TempCgroup("bpfwall-test-scnpm") as top, ExitStack() as stack:
        far = NetNamespace("bpfwall-test-scnpm").create()
        stack.callback(far.remove)
        _link(near, far)
        text = _relocate(PREAMBLE.get(example, "") + (DATA / example).read_text(), os.path.basename(top.path))
        result = import_text(text, example)
        assert result.problems == [], result.problems
        policy_file = trusted_tmp_path / "imported.toml"
        policy_file.write_text(result.toml)
        entries = load_policy(files=[str(policy_file)]).entries
        assert entries and all(getattr(e, direction) is not None for e in entries)
        cgroups = {e.name: _cgroup(stack, e.cgroup) for e in entries}

        _nft(near.name, text)
        _nft(near.name, "".join(f"add rule {r.text}\n" for r in scnpm_rules(text)[0]))  # as scnpm does
        by_nft = {name: _exchange(specs, direction, cg, far) for name, cg in cgroups.items()}
        _nft(near.name, "flush ruleset\n")

        by_bpf = {}
        for entry in entries:
            bpf.load(pin_root, entry.name, entry.program(), entry.params, entry.sets)
            bpf.attach(pin_root, entry.name, cgroups[entry.name].path)
            try:
                by_bpf[entry.name] = _exchange(specs, direction, cgroups[entry.name], far)
            finally:
                bpf.detach(pin_root, entry.name, cgroups[entry.name].path)
                bpf.unload(pin_root, entry.name)

    mismatches = []
    for entry in entries:
        expr = analyze(getattr(entry, direction)).expr
        for spec, nft_passed, bpf_passed in zip(specs, by_nft[entry.name], by_bpf[entry.name], strict=True):
            reference = evaluate(expr, _fields(spec, direction), direction, {}, {})
            if not nft_passed == bpf_passed == reference:
                mismatches.append(f"{entry.name} {spec.describe()}: nft {nft_passed}, bpfwall {bpf_passed}, "
                                  f"reference {reference}")
        # the example decides both ways for the unit, so agreeing is not agreeing on one verdict
        assert len(set(by_nft[entry.name])) == 2, (entry.name, by_nft[entry.name])
    assert not mismatches, f"{example}:\n" + "\n".join(mismatches)


# -- random rulesets ------------------------------------------------------------

@st.composite
def _egress_specs(draw) -> list[PacketSpec]:
    """Packets the unit sends: to the other side's addresses and the ports the rulesets name."""
    out = []
    for k in range(draw(st.integers(6, 10))):
        family = draw(st.sampled_from([4, 6]))
        kind = draw(st.sampled_from(["tcp", "udp", "ping"]))
        if draw(st.integers(0, 3)) == 0:  # by my-vpn
            src, dst = VPN_A[family == 6], VPN_B[family == 6]
        else:
            src, dst = (A4, draw(st.sampled_from(B4 + B4_MORE))) if family == 4 else \
                (A6, draw(st.sampled_from(B6 + B6_MORE)))
        if kind == "ping":
            out.append(PacketSpec("ping", family, src, dst, icmp_type=8 if family == 4 else 128,
                                  payload=draw(st.sampled_from([8, 100]))))
        else:
            out.append(PacketSpec(kind, family, src, dst, draw(st.sampled_from(MODEL_PORTS + [41000 + k])),
                                  draw(st.sampled_from(MODEL_PORTS + [9])),
                                  payload=draw(st.sampled_from([8, 100])) if kind == "udp" else 0))
    return compatible(out)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(tables=rulesets(other_hook=None), flat=st.booleans(), specs=_egress_specs())
def test_random_rulesets_in_real_nft_and_bpfwall_agree(world, pin_root, tables, flat, specs):
    """Random rulesets (jumps, gotos, returns, several tables and base chains, rules for the unit's
    cgroup, for another's and for none) decide the unit's packets alike in nft and in bpfwall."""
    near, far, top, cgroups = world
    text = _relocate(render(tables, flat), top)
    result = import_text(text, "random.conf")
    assert all(p.why.startswith("cannot tell which hook chain") for p in result.problems), (text, result.problems)
    egress = tomllib.loads(result.toml)["units"][UNIT]["egress"]
    checked = analyze(egress)
    cg = cgroups[UNIT]
    _nft(near.name, "flush ruleset\n" + text)
    try:
        _nft(near.name, "".join(f"add rule {r.text}\n" for r in scnpm_rules(text)[0]))
        by_nft = _exchange(specs, "egress", cg, far)
    finally:
        _nft(near.name, "flush ruleset\n")
    bpf.load(pin_root, UNIT, UnitProgram(None, checked))
    bpf.attach(pin_root, UNIT, cg.path)
    try:
        by_bpf = _exchange(specs, "egress", cg, far)
    finally:
        bpf.detach(pin_root, UNIT, cg.path)
        bpf.unload(pin_root, UNIT)
    mismatches = [f"{spec.describe()}: nft {n}, bpfwall {b}" for spec, n, b in zip(specs, by_nft, by_bpf, strict=True)
                  if n != b or n != evaluate(checked.expr, _fields(spec, "egress"), "egress", {}, {})]
    assert not mismatches, f"{text}\n{egress}\n" + "\n".join(mismatches)
    for passed in by_nft:
        _verdicts[passed] += 1


def test_random_rulesets_decided_both_ways():
    """Runs after the property test (file order): the packets compared passed and were dropped,
    both many times, so agreeing was not agreeing on one verdict."""
    print(f"random rulesets: {_verdicts[True]} packets passed, {_verdicts[False]} dropped")
    assert min(_verdicts.values()) >= EXAMPLES // 2, _verdicts


@pytest.fixture(scope="module")
def world():
    """Namespace A (this thread in it) joined to B, and the cgroups the random rulesets name."""
    with NetNamespace("bpfwall-test-scnpm") as near, TempCgroup("bpfwall-test-scnpm") as top, ExitStack() as stack:
        far = NetNamespace("bpfwall-test-scnpm").create()
        stack.callback(far.remove)
        _link(near, far)
        name = os.path.basename(top.path)
        cgroups = {UNIT: _cgroup(stack, f"{name}/{CGROUP}")}
        _cgroup(stack, f"{name}/{OTHER}")
        yield near, far, name, cgroups
