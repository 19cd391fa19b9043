"""Parity of slice defaults: the same policy — a slice default, a nested slice's default, a unit's
own entry, generated expressions for each direction or none — applied by the real watcher
(`bpfwall watch --once`) with each backend, then real packets to and from sockets in each cgroup
of the tree; every delivery is compared with the reference semantics: the entry
policy/judge.py says judges the socket's cgroup in that direction, run by the reference
evaluator (no entry: the packet passes).

    <root>/s.slice                  default S (both, one or no direction)
    <root>/s.slice/a.service        own entry A (maybe)          sockets here, or in a.service/worker
    <root>/s.slice/b.service        no entry: S judges
    <root>/s.slice/inner.slice      nested default I (maybe)
    <root>/s.slice/inner.slice/c.service   I judges, else S
    <root>/s.slice/a.service/held.slice/d.service   a slice inside a unit (delegated, like
                                    user@1000.service's app.slice) with default H (maybe): H, else A, else S
    <root>/o.service                outside the slice: unpoliced

UDP and ICMP only (TCP's handshake crosses both ways, and both directions are filtered here).
Everything runs in a network namespace of the test's own (nft rules are per namespace; the
watcher runs in it with nsenter). BPFWALL_PARITY_DEFAULT_EXAMPLES=60 for a longer soak.
"""
from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall.backends import nft
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.policy import Entry, Policy, judge, show_element
from bpfwall.sandbox import TempCgroup
from tests.kernel.invoke import PYTHON, REPO
from tests.kernel.realpackets import INGRESS_KINDS, KINDS, Exchange, compatible, packet_specs
from tests.kernel.watcher import inside, remove_tree
from tests.strategies import expressions, param_values, set_values

pytestmark = [pytest.mark.kernel, pytest.mark.traffic]

EXAMPLES = int(os.environ.get("BPFWALL_PARITY_DEFAULT_EXAMPLES", "12"))
PACKETS = 8
LEAVES = ["s.slice/a.service", "s.slice/a.service/worker", "s.slice/b.service", "s.slice/inner.slice/c.service",
          "s.slice/a.service/held.slice/d.service", "o.service"]
ENTRIES = {"s.slice": "S", "a.service": "A", "inner.slice": "I", "held.slice": "H"}
_ran = {"bpf": 0, "nft": 0, "by_how": {}}


@pytest.fixture(scope="module")
def world(nft_world):
    netns, _ = nft_world
    root = TempCgroup("bpfwall-test-defaults")
    root.__enter__()
    try:
        for leaf in LEAVES:
            os.makedirs(os.path.join(root.path, leaf), exist_ok=True)
        yield netns.name, root.path
    finally:
        remove_tree(root.path)


@pytest.fixture
def places(world, pin_root, tmp_path, trusted_tmp_path, monkeypatch):
    """Per backend: a pin root, an nft table (its state under tmp_path), a watcher state directory."""
    monkeypatch.setenv("BPFWALL_NFT_STATE_DIR", str(tmp_path / "nft-state"))
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    policy_dir = trusted_tmp_path / "policy"
    policy_dir.mkdir()
    try:
        yield {"pin_root": pin_root, "table": table, "policy_dir": policy_dir, "state": tmp_path / "state"}
    finally:
        nft.destroy(table)


def _prefixed(text: str, prefix: str) -> str:
    """The expression with its $params and @sets renamed (each direction its own names)."""
    return re.sub(r"([$@])([A-Za-z_][A-Za-z0-9_]*)", lambda m: f"{m[1]}{prefix}{m[2]}", text)


@st.composite
def filters(draw, prefix: str):
    """(text, params, sets) of one direction's filter, or None (the direction left out)."""
    if not draw(st.integers(0, 3)):
        return None
    checked = analyze(_prefixed(draw(expressions(max_leaves=6)), prefix))
    params = {n: draw(param_values().filter(lambda v: v < 2**63)) for n in checked.params}
    sets = {n: draw(set_values(kind)) for n, kind in checked.sets.items()}
    return checked.text, params, sets


@st.composite
def policies(draw):
    """{entry name: {direction: (text, params, sets) or None}}: S always, A, I and H sometimes."""
    out = {}
    for name, tag in ENTRIES.items():
        if name != "s.slice" and not draw(st.booleans()):
            continue
        body = {d: draw(filters(f"{tag}{d[0]}_")) for d in ("ingress", "egress")}
        if not any(body.values()):
            body["egress"] = ("false", {}, {})  # an entry needs a direction: the deny-all default
        out[name] = body
    return out


def _toml(policy: dict, backend: str) -> str:
    lines = ["[defaults]", f'backend = "{backend}"', ""]
    for name, body in policy.items():
        lines.append(f'[units."{name}"]')
        params, sets = {}, {}
        for d, f in body.items():
            if f is not None:
                lines.append(f"{d} = {_quote(f[0])}")
                params.update(f[1])
                sets.update(f[2])
        if params:
            lines.append("params = { " + ", ".join(f"{k} = {v}" for k, v in params.items()) + " }")
        if sets:
            lines.append("sets = { " + ", ".join(
                f"{k} = [" + ", ".join(_quote(show_element(e)) for e in v) + "]" for k, v in sets.items()) + " }")
        lines.append("")
    return "\n".join(lines)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reference(policy: dict, leaf: str, direction: str):
    """The judging entry's (expression, params, sets) for the leaf, by policy/judge.py; None: unpoliced."""
    entries = [Entry(name=n, ingress=b["ingress"] and b["ingress"][0], egress=b["egress"] and b["egress"][0],
                     params={}, sets={}, mode="enforce", backend="bpf", set_capacity=16, cgroup=None,
                     file="p.toml", line=i + 1) for i, (n, b) in enumerate(policy.items())]
    j = judge(Policy(entries), leaf)
    _ran["by_how"][j.how(direction)] = _ran["by_how"].get(j.how(direction), 0) + 1
    e = j.entry(direction)
    return None if e is None else policy[e.name][direction]


def _apply(places: dict, netns: str, root: str, text: str, backend: str) -> None:
    (places["policy_dir"] / "10-p.toml").write_text(text)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", PYTHON, "-m", "bpfwall", "watch", "--once",
                        "--cgroup-root", root, "--policy-dir", str(places["policy_dir"]),
                        "--pin-root", places["pin_root"], "--state-dir", str(places["state"] / backend),
                        "--table", places["table"]],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "BPFWALL_LOG": "stderr"})
    assert r.returncode == 0, f"watch --once ({backend}) failed:\n{text}\n{r.stderr}"


class _Leaf:
    """A cgroup of the tree as Exchange wants it: sockets made in entered() belong to it."""

    def __init__(self, path: str):
        self.path = path

    def entered(self):
        return inside(self.path)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(policy=policies(), leaf=st.sampled_from(LEAVES), direction=st.sampled_from(["ingress", "egress"]),
       data=st.data())
@pytest.mark.parametrize("backend", ["nft", "bpf"])
def test_defaults_agree_with_the_reference(world, places, backend, policy, leaf, direction, data):
    netns, root = world
    # No TCP: a connection needs the SYN out and the SYN-ACK back, and here both directions are
    # filtered; a UDP datagram or an ICMP message crosses the boundary once.
    kinds = [k for k in (KINDS if direction == "egress" else INGRESS_KINDS) if k != "tcp"]
    specs = data.draw(st.lists(packet_specs(kinds), min_size=PACKETS, max_size=PACKETS).map(compatible))
    _apply(places, netns, root, _toml(policy, backend), backend)
    judging = _reference(policy, leaf, direction)
    if judging is None:
        expected = [True] * len(specs)
    else:
        expr = analyze(judging[0]).expr
        expected = [evaluate(expr, s.fields(), direction, judging[1], judging[2]) for s in specs]
    with Exchange(specs, direction, _Leaf(os.path.join(root, leaf))) as exchange:
        observed = exchange.run()
    _ran[backend] += len(specs)
    wrong = [f"  {s.describe()}: kernel {'pass' if o else 'drop'}, reference {'pass' if e else 'drop'}"
             for s, o, e in zip(specs, observed, expected, strict=True) if o != e]
    assert not wrong, (f"{backend}, {direction} from {leaf}: {len(wrong)} verdict(s) differ\n"
                       f"policy:\n{_toml(policy, backend)}\njudged by: {judging}\n" + "\n".join(wrong))


def test_every_kind_of_judgement_was_seen():
    """After the property test: packets judged by own entries, by defaults and by nothing, on both backends."""
    print(f"defaults parity: {_ran}")
    assert _ran["nft"] > 0 and _ran["bpf"] > 0
    assert {"own", "default", "none"} <= set(_ran["by_how"]), _ran
