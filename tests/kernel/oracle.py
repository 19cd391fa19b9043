"""The oracle check the differential tests share: a scenario's program run in the kernel
(BPF_PROG_TEST_RUN) decides every packet as the reference evaluator does."""
from __future__ import annotations

from dataclasses import replace

from bpfwall.backends import bpf
from bpfwall.build import UnitProgram
from bpfwall.lang.evaluator import evaluate
from bpfwall.lang.packet import parse_packet


def program_of(scenario, compiler: str = "auto") -> UnitProgram:
    """The unit program of a tests.strategies.scenarios() case: its expression in its direction."""
    checked, direction, _, _, _, load_bytes_only = scenario
    return UnitProgram(checked if direction == "ingress" else None, checked if direction == "egress" else None,
                       load_bytes_only=load_bytes_only, compiler=compiler)


def agrees(scenario, cache=None, devices: list[str] | None = None, compiler: str = "auto") -> int:
    """Assert the kernel's verdicts equal the reference's (the program built by `compiler` through
    `cache`: from it, when it holds the program already); the number of packets compared. `devices`:
    the device each packet comes by (this namespace's; default lo), which ifname reads."""
    checked, direction, params, sets, batch, load_bytes_only = scenario
    devices = devices or ["lo"] * len(batch)
    verdicts = bpf.test_run(program_of(scenario, compiler), direction, batch, params, sets, cache=cache,
                            devices=devices)
    for data, device, verdict in zip(batch, devices, verdicts, strict=True):
        fields = replace(parse_packet(data), ifname=device)
        expected = evaluate(checked.expr, fields, direction, params, sets)
        assert verdict == expected, (
            f"kernel ({compiler}) says {'pass' if verdict else 'drop'}, reference {'pass' if expected else 'drop'}\n"
            f"expression: {checked.text}\ndirection: {direction}, load_bytes_only: {load_bytes_only}\n"
            f"params: {params}\nsets: {sets}\npacket: {data.hex()} on {device}\nfields: {fields}")
    return len(batch)
