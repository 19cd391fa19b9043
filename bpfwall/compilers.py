"""Which compiler builds a unit's object: clang (the binary) or bcc (python3-bpfcc).

Both compile the same bpf/port_filter.c and generated header into an object that bpfwall's
own loader loads (build.py for clang, bcc_build.py for bcc). The choice, first given wins:
`--compiler`, $BPFWALL_COMPILER, `compiler =` in the policy's [defaults], else `auto`: clang
when its binary is found, else bcc when it can compile here, else one error naming what is
missing for each.
"""
from __future__ import annotations

import os

NAMES = ("clang", "bcc")
CHOICES = (*NAMES, "auto")
UNRECORDED = "clang"  # what built a unit whose meta names no compiler: only clang did then


def override(given: str | None = None) -> str | None:
    """The choice given on the command line (`given`) or in $BPFWALL_COMPILER, or None."""
    from .errors import UsageError

    value = given or os.environ.get("BPFWALL_COMPILER") or None
    if value is not None and value not in CHOICES:
        raise UsageError(f"compiler {value!r} (from BPFWALL_COMPILER): choose {', '.join(CHOICES)}")
    return value


def resolve(choice: str) -> str:
    """The compiler `choice` names: itself, or for auto the one available here."""
    if choice != "auto":
        return choice
    from .build import BuildError, _clang as clang

    try:
        clang()
        return "clang"
    except BuildError as e:
        no_clang = str(e)
    from . import bcc_build

    problem = bcc_build.missing()
    if problem is None:
        return "bcc"
    raise BuildError(f"no compiler for BPF programs: {no_clang}; and {problem}")


def describe(choice: str) -> str:
    """What `choice` builds with here, for `explain`: never fails."""
    from .errors import Error

    try:
        name = resolve(choice)
    except Error as e:
        return f"none ({e})"
    return name if choice == name else f"{name} (auto)"
