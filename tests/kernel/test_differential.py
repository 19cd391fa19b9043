"""The oracle test: the kernel's verdict equals the reference evaluator's.

Hypothesis draws an expression (every language feature), a direction, values
for its params and sets, and a batch of packets; the compiled program runs
each packet through BPF_PROG_TEST_RUN. One compile serves the whole batch, so
a CI run checks well over 2,000 (expression, packet) cases.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.kernel.oracle import agrees
from tests.strategies import scenarios

pytestmark = [pytest.mark.kernel]

# BPFWALL_DIFF_EXAMPLES=2000 for a longer soak; CI runs the default.
EXAMPLES = int(os.environ.get("BPFWALL_DIFF_EXAMPLES", "120"))
MIN_CASES = 2000
_cases = {"n": 0}


# No shrinking: every example compiles a program, and the assertion message
# already names the expression, values and packet that disagree.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(scenarios())
def test_kernel_agrees_with_reference(cache_dir, scenario):
    _cases["n"] += agrees(scenario)


def test_enough_cases_ran():
    """Runs after the property test (file order): the comparison happened at scale."""
    assert _cases["n"] >= MIN_CASES, f"only {_cases['n']} cases compared"
