"""Cross-backend parity: real packets through each backend decide as the reference evaluator does.

Hypothesis draws an expression (every language feature: &&, ||, !, ranges, literal
sets, CIDRs, $params, @sets, local_/remote_ aliases), a direction, values for its
params and sets, and a batch of packets. For each backend the expression is
loaded once and attached to a cgroup; the kernel then builds and sends every
packet for real, across the cgroup boundary inside a private network namespace
(realpackets.py), and whether it arrived is compared with
`evaluate(expr, spec.fields(), direction, params, sets)`.

The namespace's loopback carries the hosts the expression strategies name
(10.0.0.1, 2001:db8::2, …; any 127.0.0.0/8 address too), so address literals,
CIDRs and address sets match real packets. UDP (v4, v6; some with IPv4 options or
an IPv6 destination-options header) and TCP (the SYN decides whether connect
succeeds) go both ways. ICMP (echo requests from ping sockets, any type/code
from raw sockets) goes out only: nft's input hook matches `socket cgroupv2` by
looking up the receiving socket, and that lookup knows TCP and UDP (and ICMP
errors quoting them) only, so an incoming echo reply is not policed by nft while
cgroup_skb ingress sees it. That difference is by design.

Every packet goes by the namespace's loopback, so `ifname` is "lo" both ways: the patterns the
strategies draw (lo, l*, wg0, *, …) give both verdicts; nft matches iifname/oifname itself,
the bpf backend through its ifaces map, filled when the unit is loaded.

BPFWALL_PARITY_EXAMPLES=300 for a longer soak; CI runs the default.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall.backends import bpf, nft
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.kernel.realpackets import Exchange, PacketSpec, batches
from tests.strategies import expressions, param_values, set_values

pytestmark = [pytest.mark.kernel, pytest.mark.traffic]

EXAMPLES = int(os.environ.get("BPFWALL_PARITY_EXAMPLES", "100"))
PACKETS_PER_EXAMPLE = 12
MIN_CASES = 500  # per backend
UNIT = "parity.service"
_cases = {"n": 0, "by_backend": {}, "expected_pass": 0, "by_kind": {}}


@dataclass
class Backend:
    """One backend behind the calls the test makes; `scope` is its pin root or nft table."""
    name: str
    module: object
    scope: str

    def apply(self, program: UnitProgram, params, sets, cgroup_path: str) -> None:
        self.module.load(self.scope, UNIT, program, params, sets)
        self.module.attach(self.scope, UNIT, cgroup_path)

    def remove(self, cgroup_path: str) -> None:
        try:
            self.module.detach(self.scope, UNIT, cgroup_path)
        finally:
            self.module.unload(self.scope, UNIT)


@pytest.fixture(scope="module")
def world(nft_world):
    """A private network namespace (this thread inside it) and one policed cgroup (conftest)."""
    return nft_world


@pytest.fixture
def nft_table(world, tmp_path, monkeypatch):
    """A table of our own (in the test's namespace), its state file under tmp_path; deleted after."""
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft-state"))
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    try:
        yield table
    finally:
        nft.destroy(table)


@pytest.fixture
def backends(pin_root, nft_table) -> list[Backend]:
    return [Backend("bpf", bpf, pin_root), Backend("nft", nft, nft_table)]


@st.composite
def scenarios(draw):
    checked = analyze(draw(expressions()))
    direction = draw(st.sampled_from(["ingress", "egress"]))
    params = {name: draw(param_values()) for name in checked.params}
    sets = {name: draw(set_values(kind)) for name, kind in checked.sets.items()}
    return checked, direction, params, sets, draw(batches(direction, PACKETS_PER_EXAMPLE))


def _verdict(passed: bool) -> str:
    return "pass" if passed else "drop"


def run_backend(backend: Backend, cg, checked, direction, params, sets, specs) -> list[bool]:
    """Load and attach `checked` for `direction`, send the batch, detach and unload: what arrived."""
    program = UnitProgram(checked if direction == "ingress" else None, checked if direction == "egress" else None)
    with Exchange(specs, direction, cg) as exchange:
        try:
            backend.apply(program, params, sets, cg.path)
        except Exception as e:  # a valid expression must load: that is a finding too
            raise AssertionError(f"backend {backend.name} refused a valid {direction} filter: {e}\n"
                                 f"  expression: {checked.text}\n  params: {params}  sets: {sets}") from e
        try:
            return exchange.run()
        finally:
            backend.remove(cg.path)


# No shrinking: each example loads programs and sends real packets, and the
# message already names everything needed to reproduce a mismatch.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(scenario=scenarios())
def test_backends_agree_with_reference(world, backends, scenario):
    _, cg = world
    checked, direction, params, sets, specs = scenario
    expected = [evaluate(checked.expr, s.fields(), direction, params, sets) for s in specs]
    _cases["expected_pass"] += sum(expected) * len(backends)
    for s in specs:
        key = f"{direction}/{s.kind}/v{s.family}" + ("+options" if s.options else "")
        _cases["by_kind"][key] = _cases["by_kind"].get(key, 0) + len(backends)
    mismatches = []
    for backend in backends:
        observed = run_backend(backend, cg, checked, direction, params, sets, specs)
        for spec, seen, want in zip(specs, observed, expected, strict=False):
            if seen != want:
                mismatches.append(
                    f"backend {backend.name}, {direction}: kernel {_verdict(seen)}, reference {_verdict(want)}\n"
                    f"  expression: {checked.text}\n  params: {params}  sets: {sets}\n"
                    f"  packet: {spec.describe()}\n  fields: {spec.fields()}")
        by = _cases["by_backend"]
        by[backend.name] = by.get(backend.name, 0) + len(specs)
        _cases["n"] += len(specs)
    assert not mismatches, f"{len(mismatches)} verdict(s) differ:\n" + "\n".join(mismatches)


def test_enough_cases_ran():
    """Runs after the property test (file order): the comparison happened at scale, on every backend."""
    print(f"parity cases: {_cases}")
    for name in ("bpf", "nft"):
        count = _cases["by_backend"].get(name, 0)
        assert count >= MIN_CASES, f"only {count} cases compared on {name} ({_cases})"


# -- the fields the reference reads are the fields on the wire ---------------------

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def _sniff_lo() -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind(("lo", 0))
    s.setblocking(False)
    return s


WIRE_SAMPLES = [
    PacketSpec("udp", 4, "10.0.0.1", "10.0.0.2", 1024, 53, 0),
    PacketSpec("udp", 6, "2001:db8::1", "::1", 8080, 443, 37),
    PacketSpec("udp", 4, "127.0.0.1", "10.1.2.3", 9, 53, 5, options=8),
    PacketSpec("udp", 6, "::1", "2001:db8::2", 9, 53, 5, options=16),
    PacketSpec("tcp", 4, "127.3.4.5", "192.168.1.1", 22, 80),
    PacketSpec("tcp", 6, "2001:db8:1::5", "2001:db8::2", 65535, 1),
    PacketSpec("tcp", 4, "10.0.0.1", "10.0.0.2", 2222, 80, options=40),
    PacketSpec("tcp", 6, "2001:db8:1::5", "2001:db8::1", 2222, 80, options=24),
    PacketSpec("ping", 4, "10.1.2.3", "127.0.0.1", payload=56, icmp_type=8),
    PacketSpec("ping", 6, "::1", "2001:db8::1", payload=3, icmp_type=128),
    PacketSpec("icmp", 4, "10.0.0.2", "10.0.0.1", payload=0, icmp_type=11, icmp_code=1),
    PacketSpec("icmp", 6, "2001:db8::2", "2001:db8::1", payload=12, icmp_type=1, icmp_code=3),
]


def test_fields_match_the_wire(world):
    """PacketSpec.fields() equals parse_packet() of the bytes the kernel actually sent."""
    _, cg = world
    for spec in WIRE_SAMPLES:
        with _sniff_lo() as sniffer, Exchange([spec], "egress", cg) as exchange:
            assert exchange.run(settle=0.02) == [True]
            time.sleep(0.01)
            seen = []
            while True:
                try:
                    frame, addr = sniffer.recvfrom(70000)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    seen.append(parse_packet(frame[14:]))
            # The first outgoing packet is ours (a SYN, the datagram, the ICMP message).
            ours = [f for f in seen if f.proto == spec.proto]
            assert ours, f"nothing sniffed for {spec.describe()}"
            assert replace(ours[0], ifname="lo") == spec.fields(), spec.describe()


def test_blocked_is_observed(world, backends):
    """The harness can fail: with `false` attached nothing arrives, with `true` everything does."""
    _, cg = world
    for backend in backends:
        for direction, kinds in (("egress", WIRE_SAMPLES), ("ingress", [s for s in WIRE_SAMPLES
                                                                       if s.kind in ("udp", "tcp")])):
            for text, want in (("false", False), ("true", True)):
                seen = run_backend(backend, cg, analyze(text), direction, {}, {}, kinds)
                assert seen == [want] * len(kinds), (backend.name, direction, text, seen)
