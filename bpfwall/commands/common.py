"""What several commands do alike: print a result, and turn the filter options into a
checked program with its values."""
from __future__ import annotations

import json

from ..errors import UsageError
from .options import compiler


def emit(args, data, text: str) -> None:
    """Print `data` as JSON with --json, else `text` (nothing if it is empty)."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text:
        print(text)


def program(args, ingress: str | None, egress: str | None):
    """The unit program of these expressions, checked, with the set capacity the options give
    (refused when its sets would take more kernel memory than allowed unforced)."""
    from ..build import DEFAULT_SET_CAPACITY, UnitProgram
    from ..capacity import check
    from ..lang.checker import analyze_pair

    capacity = getattr(args, "set_capacity", None)
    capacity = DEFAULT_SET_CAPACITY if capacity is None else capacity
    ingress_checked, egress_checked = analyze_pair(ingress, egress)
    unit_program = UnitProgram(ingress_checked, egress_checked, capacity, compiler=compiler(args) or "auto")
    check(unit_program.sets, capacity, getattr(args, "force_capacity", False), f"--set-capacity {capacity}",
          "--force-capacity")
    return unit_program


def filter_program(args, command: str):
    """The program of --ingress/--egress (at least one of them is needed)."""
    if args.ingress is None and args.egress is None:
        raise UsageError(f"{command}: give --ingress EXPR, --egress EXPR or both")
    return program(args, args.ingress, args.egress)


def param_values(args) -> dict[str, int]:
    """--param NAME=VALUE…"""
    from ..lang.values import parse_param_assignment

    return dict(parse_param_assignment(a) for a in args.param)


def set_values(args, unit_program) -> dict[str, list]:
    """--set NAME=E1,E2…, parsed as the kind of set the program's @NAME is."""
    from ..lang.values import parse_set_assignment, parse_set_elements

    out = {}
    for a in args.set:
        name, raw = parse_set_assignment(a)
        kind = unit_program.sets.get(name)
        if kind is None:
            have = ", ".join("@" + s for s in sorted(unit_program.sets)) or "none"
            raise UsageError(f"--set {name}: the filter has no set @{name} (its sets: {have})")
        out[name] = parse_set_elements(name, kind, raw)
    return out
