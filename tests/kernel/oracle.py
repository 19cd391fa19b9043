"""The oracle check the differential tests share: a scenario's program run in the kernel
(BPF_PROG_TEST_RUN) decides every packet as the reference evaluator does."""
from __future__ import annotations

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet


def program_of(scenario) -> UnitProgram:
    """The unit program of a tests.strategies.scenarios() case: its expression in its direction."""
    checked, direction, _, _, _, load_bytes_only = scenario
    return UnitProgram(checked if direction == "ingress" else None, checked if direction == "egress" else None,
                       load_bytes_only=load_bytes_only)


def agrees(scenario, cache=None) -> int:
    """Assert the kernel's verdicts equal the reference's (the program built through `cache`:
    from it, when it holds the program already); the number of packets compared."""
    checked, direction, params, sets, batch, load_bytes_only = scenario
    verdicts = bpf.test_run(program_of(scenario), direction, batch, params, sets, cache=cache)
    for data, verdict in zip(batch, verdicts, strict=True):
        expected = evaluate(checked.expr, parse_packet(data), direction, params, sets)
        assert verdict == expected, (
            f"kernel says {'pass' if verdict else 'drop'}, reference {'pass' if expected else 'drop'}\n"
            f"expression: {checked.text}\ndirection: {direction}, load_bytes_only: {load_bytes_only}\n"
            f"params: {params}\nsets: {sets}\npacket: {data.hex()}\nfields: {parse_packet(data)}")
    return len(batch)
