"""The oracle test: the kernel's verdict equals the reference evaluator's.

Hypothesis draws an expression (every language feature), a direction, values
for its params and sets, and a batch of packets; the compiled program runs
each packet through BPF_PROG_TEST_RUN. One compile serves the whole batch, so
a CI run checks well over 2,000 (expression, packet) cases.

Each packet comes by one of the devices the strategies name (lo, wg0, eth0, wlan0, wlan10):
the module runs in a network namespace of its own where they exist (veths), and the test run
hands the program the packet on that device (ctx ifindex), so `ifname` is compared too.
Every example is compiled by both compilers (clang and bcc, see bpfwall/compilers.py),
and both programs must give the reference's verdict on every packet.
"""
from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from tests.kernel.oracle import agrees
from tests.kernel.realpackets import NetNamespace
from tests.strategies import DEVICES, PACKETS_PER_EXAMPLE, scenarios

pytestmark = [pytest.mark.kernel]

# BPFWALL_DIFF_EXAMPLES=2000 for a longer soak; CI runs the default.
EXAMPLES = int(os.environ.get("BPFWALL_DIFF_EXAMPLES", "120"))
COMPILERS = ("clang", "bcc")
MIN_CASES = 2000
_cases = {"n": 0}


@pytest.fixture(scope="module", autouse=True)
def namespace_with_devices():
    """This thread in a namespace of its own that has every device of DEVICES (veth pairs)."""
    with NetNamespace() as ns:
        for i, name in enumerate(d for d in DEVICES if d != "lo"):
            subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"peer{i}"],
                           check=True, capture_output=True)
        yield ns


# No shrinking: every example compiles a program, and the assertion message
# already names the expression, values and packet that disagree.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(scenarios(), st.lists(st.sampled_from(DEVICES), min_size=PACKETS_PER_EXAMPLE, max_size=PACKETS_PER_EXAMPLE))
def test_kernel_agrees_with_reference(cache_dir, scenario, devices):
    # Both compilers, one after the other: each program agrees with the reference on every
    # packet, so the two agree with each other.
    _cases["n"] += sum(agrees(scenario, devices=devices, compiler=c) for c in COMPILERS) // len(COMPILERS)


def test_enough_cases_ran():
    """Runs after the property test (file order): the comparison happened at scale."""
    assert _cases["n"] >= MIN_CASES, f"only {_cases['n']} cases compared"
