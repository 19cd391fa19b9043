"""The oracle test: the kernel's verdict equals the reference evaluator's.

Hypothesis draws an expression (every language feature), a direction, values
for its params and sets, and a batch of packets; the compiled program runs
each packet through BPF_PROG_TEST_RUN. One compile serves the whole batch, so
a CI run checks well over 2,000 (expression, packet) cases.

Each packet comes by one of the devices the strategies name (lo, wg0, eth0, wlan0, wlan10):
the module runs in a network namespace of its own where they exist (veths), and the test run
hands the program the packet on that device (ctx ifindex), so `ifname` is compared too.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.kernel.realpackets import NetNamespace
from tests.strategies import DEVICES, expressions, packets, param_values, set_values

pytestmark = [pytest.mark.kernel]

# BPFWALL_DIFF_EXAMPLES=2000 for a longer soak; CI runs the default.
EXAMPLES = int(os.environ.get("BPFWALL_DIFF_EXAMPLES", "120"))
PACKETS_PER_EXAMPLE = 24
MIN_CASES = 2000
_cases = {"n": 0}


@pytest.fixture(scope="module", autouse=True)
def devices():
    """This thread in a namespace of its own that has every device of DEVICES (veth pairs)."""
    with NetNamespace() as ns:
        for i, name in enumerate(d for d in DEVICES if d != "lo"):
            subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"peer{i}"],
                           check=True, capture_output=True)
        yield ns


@st.composite
def scenarios(draw):
    text = draw(expressions())
    checked = analyze(text)
    direction = draw(st.sampled_from(["ingress", "egress"]))
    params = {name: draw(param_values()) for name in checked.params}
    sets = {name: draw(set_values(kind)) for name, kind in checked.sets.items()}
    batch = draw(st.lists(st.tuples(packets(), st.sampled_from(DEVICES)),
                          min_size=PACKETS_PER_EXAMPLE, max_size=PACKETS_PER_EXAMPLE))
    # Half the programs read every header through bpf_skb_load_bytes: the path real
    # traffic takes for bytes outside the linear area must decide the same way.
    load_bytes_only = draw(st.booleans())
    return checked, direction, params, sets, batch, load_bytes_only


# No shrinking: every example compiles a program, and the assertion message
# already names the expression, values and packet that disagree.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(scenarios())
def test_kernel_agrees_with_reference(cache_dir, scenario):
    checked, direction, params, sets, batch, load_bytes_only = scenario
    program = UnitProgram(checked if direction == "ingress" else None, checked if direction == "egress" else None,
                          load_bytes_only=load_bytes_only)
    verdicts = bpf.test_run(program, direction, [data for data, _ in batch], params, sets,
                            devices=[device for _, device in batch])
    for (data, device), verdict in zip(batch, verdicts, strict=True):
        fields = replace(parse_packet(data), ifname=device)
        expected = evaluate(checked.expr, fields, direction, params, sets)
        assert verdict == expected, (
            f"kernel says {'pass' if verdict else 'drop'}, reference {'pass' if expected else 'drop'}\n"
            f"expression: {checked.text}\ndirection: {direction}, load_bytes_only: {load_bytes_only}\nparams: {params}\nsets: {sets}\n"
            f"packet: {data.hex()} on {device}\nfields: {fields}")
    _cases["n"] += len(batch)


def test_enough_cases_ran():
    """Runs after the property test (file order): the comparison happened at scale."""
    assert _cases["n"] >= MIN_CASES, f"only {_cases['n']} cases compared"
