"""The oracle test: the kernel's verdict equals the reference evaluator's.

Hypothesis draws an expression (every language feature), a direction, values
for its params and sets, and a batch of packets; the compiled program runs
each packet through BPF_PROG_TEST_RUN. One compile serves the whole batch, so
a CI run checks well over 2,000 (expression, packet) cases. Every example is
compiled by both compilers (clang and bcc, see bpfwall/compilers.py), and both
programs must give the reference's verdict on every packet.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.lang.checker import analyze
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet
from tests.strategies import expressions, packets, param_values, set_values

pytestmark = [pytest.mark.kernel]

# BPFWALL_DIFF_EXAMPLES=2000 for a longer soak; CI runs the default.
EXAMPLES = int(os.environ.get("BPFWALL_DIFF_EXAMPLES", "120"))
COMPILERS = ("clang", "bcc")
PACKETS_PER_EXAMPLE = 24
MIN_CASES = 2000
_cases = {"n": 0}


@st.composite
def scenarios(draw):
    text = draw(expressions())
    checked = analyze(text)
    direction = draw(st.sampled_from(["ingress", "egress"]))
    params = {name: draw(param_values()) for name in checked.params}
    sets = {name: draw(set_values(kind)) for name, kind in checked.sets.items()}
    batch = draw(st.lists(packets(), min_size=PACKETS_PER_EXAMPLE, max_size=PACKETS_PER_EXAMPLE))
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
    verdicts = {}
    for compiler in COMPILERS:
        program = UnitProgram(checked if direction == "ingress" else None, checked if direction == "egress" else None,
                              load_bytes_only=load_bytes_only, compiler=compiler)
        verdicts[compiler] = bpf.test_run(program, direction, batch, params, sets)
    for i, data in enumerate(batch):
        expected = evaluate(checked.expr, parse_packet(data), direction, params, sets)
        for compiler in COMPILERS:
            verdict = verdicts[compiler][i]
            assert verdict == expected, (
                f"kernel ({compiler}-built) says {'pass' if verdict else 'drop'}, reference {'pass' if expected else 'drop'}\n"
                f"expression: {checked.text}\ndirection: {direction}, load_bytes_only: {load_bytes_only}\nparams: {params}\nsets: {sets}\n"
                f"packet: {data.hex()}\nfields: {parse_packet(data)}")
    _cases["n"] += len(batch)


def test_enough_cases_ran():
    """Runs after the property test (file order): the comparison happened at scale."""
    assert _cases["n"] >= MIN_CASES, f"only {_cases['n']} cases compared"
