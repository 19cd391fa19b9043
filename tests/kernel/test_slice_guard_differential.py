"""Slice defaults, kernel against the reference: random trees of slices and units (units holding
slices and units too, as delegated ones do), random policies
of slice defaults (exact and `*.slice`) and unit entries (a direction may be left out, falling to
the nearest default), put in place by `bpfwall watch --once`; then one UDP datagram from every
cgroup to each of two ports. Each one must arrive exactly when the reference says: the entry
judge.judge() names (the nearest up the tree) passes it by the reference evaluator, or no entry
judges it. Examples: BPFWALL_SLICE_DIFF_EXAMPLES (default 8; each is a watcher run).
"""
from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from bpfwall.policy import judge, load_policy
from bpfwall.sandbox import TempCgroup
from tests.kernel.invoke import bpfwall
from tests.kernel.sockets import udp_receivers
from tests.kernel.watcher import inside, remove_tree, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.traffic, pytest.mark.usefixtures("no_leaks")]

EXAMPLES = int(os.environ.get("BPFWALL_SLICE_DIFF_EXAMPLES", "8"))
SLICES = ("a.slice", "b.slice", "c.slice")
UNITS = ("x.service", "y.service")

# (slices, unit, a worker sub-cgroup in it, what the unit holds: None, or (slices, unit) below it,
# as a delegated unit like user@1000.service holds its own slices and units)
paths = st.lists(st.tuples(st.lists(st.sampled_from(SLICES), max_size=3, unique=True), st.sampled_from(UNITS),
                           st.booleans(),
                           st.one_of(st.none(), st.tuples(st.lists(st.sampled_from(SLICES), max_size=2, unique=True),
                                                          st.sampled_from(UNITS)))),
                 min_size=1, max_size=5)
# per entry: None (no entry), or (egress choice or None: left out, strict)
entries = st.fixed_dictionaries({name: st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 3)),
                                                                          st.booleans()))
                                 for name in (*SLICES, "*.slice", *UNITS)})


def expression(choice: int, ports) -> str:
    return ("true", "false", f"udp && remote_port == {ports[0]}", f"udp && remote_port == {ports[1]}")[choice]


def policy_text(chosen, ports) -> str:
    out = []
    for name, spec in chosen.items():
        if spec is None:
            continue
        egress, strict = spec
        out.append(f'[units."{name}"]')
        out.append(f'egress = "{expression(egress, ports)}"' if egress is not None else 'ingress = "true"')
        if strict and name.endswith(".slice"):
            out.append("strict = true")
        out.append("")
    return "\n".join(out)


def udp_packet(sport: int, dport: int) -> bytes:
    """The datagram as the egress program sees it (IPv4 + UDP + 'x')."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 0, 0, 64, 17, 0, socket.inet_aton("127.0.0.1"),
                     socket.inet_aton("127.0.0.1"))
    return ip + struct.pack("!HHHH", sport, dport, 9, 0) + b"x"


@pytest.fixture
def receivers():
    with udp_receivers(2, 4 << 20) as socks:
        yield socks


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=paths, chosen=entries)
# always: a deny-all default with a unit allowing one port below it, a nested slice leaving egress
# out (so the outer default judges it), a unit's sub-cgroup, and `*.slice` on a slice of its own
@example(tree=[(["a.slice"], "x.service", True, None), (["a.slice", "b.slice"], "y.service", False, None),
               (["c.slice"], "x.service", False, None)],
         chosen={"a.slice": (1, True), "b.slice": (None, False), "c.slice": None, "*.slice": (2, False),
                 "x.service": (3, False), "y.service": None})
# a unit holding a slice with a default and a unit with its own entry: each judged by its nearest
@example(tree=[(["a.slice"], "x.service", True, (["b.slice"], "y.service")),
               (["a.slice"], "x.service", False, ([], "y.service"))],
         chosen={"a.slice": None, "b.slice": (3, False), "c.slice": None, "*.slice": None,
                 "x.service": (2, False), "y.service": (0, False)})
def test_kernel_verdicts_equal_the_reference(tree, chosen, pin_root, policy_dir, trusted_tmp_path, receivers):
    ports = [s.getsockname()[1] for s in receivers]
    write_policy(policy_dir, policy_text(chosen, ports))
    policy = load_policy(directory=str(policy_dir))
    cg = TempCgroup("bpfwall-test-slicediff")
    cg.__enter__()
    try:
        rels = set()
        for slices, unit, worker, held in tree:
            rel = "/".join([*slices, unit] + (["worker"] if worker else []))
            os.makedirs(os.path.join(cg.path, rel), exist_ok=True)
            rels.add(rel)
            if held is not None:
                rel = "/".join([*slices, unit, *held[0], held[1]])
                os.makedirs(os.path.join(cg.path, rel), exist_ok=True)
                rels.add(rel)
        r = bpfwall("watch", "--once", "--cgroup-root", cg.path, "--policy-dir", str(policy_dir),
                    "--pin-root", pin_root, "--state-dir", str(trusted_tmp_path / "state"))
        assert r.returncode == 0, r.stderr
        expected, arrived, refused = set(), set(), set()
        senders = {}
        for rel in sorted(rels):
            with inside(os.path.join(cg.path, rel)):
                senders[rel] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            senders[rel].bind(("127.0.0.1", 0))
        try:
            for rel, s in senders.items():
                entry = judge(policy, rel).entry("egress")
                for i, port in enumerate(ports):
                    fields = parse_packet(udp_packet(s.getsockname()[1], port))
                    if entry is None or evaluate(entry.checked[1].expr, fields, "egress"):
                        expected.add((rel, i))
                    try:
                        s.sendto(f"{rel}|{i}".encode(), ("127.0.0.1", port))
                    except PermissionError:
                        refused.add((rel, i))
        finally:
            for s in senders.values():
                s.close()
        for i, rx in enumerate(receivers):
            rx.settimeout(0.2)
            try:
                while True:
                    rel, j = rx.recv(512).decode().split("|")
                    assert int(j) == i
                    arrived.add((rel, i))
            except TimeoutError:
                pass
        everything = {(rel, i) for rel in rels for i in range(2)}
        assert arrived == expected, f"policy:\n{policy_text(chosen, ports)}\narrived {sorted(arrived)}"
        assert refused == everything - expected
    finally:
        remove_tree(cg.path)
