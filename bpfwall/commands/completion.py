"""Tab completion: argcomplete's completers for what only the system knows.

The shell hook (Debian's package ships it as /usr/share/bash-completion/completions/bpfwall,
made by register-python-argcomplete) runs `bpfwall` with _ARGCOMPLETE set; cli.main hands the
parser to argcomplete, which completes commands and options from the parser itself and asks
these functions for loaded units, policy units and a unit's params and sets.

They only read: the pin root's directory names (a unit's key) and, for `set`, the unit's
metadata pin. Anyone not allowed to read them (not root: bpffs is mode 0700) gets no
candidates, never an error, and nothing is compiled or loaded.
"""
from __future__ import annotations

from .options import pin_root, policy_dir

QUIET = (Exception,)  # a completer that fails offers nothing: never a traceback in the shell


def loaded_units(prefix: str, parsed_args, **_) -> list[str]:
    from ..backends import bpf

    try:
        names = bpf.units(pin_root(parsed_args))
    except QUIET:
        return []
    return [n for n in names if n.startswith(prefix)]


def policy_units(prefix: str, parsed_args, **_) -> list[str]:
    """Units the policy names exactly (a glob entry is not a unit name to apply)."""
    from ..policy import load_policy

    try:
        policy = load_policy(directory=policy_dir(parsed_args))
    except QUIET:
        return []
    return sorted({e.name for e in policy.entries if not e.is_glob and e.name.startswith(prefix)})


def changes(prefix: str, parsed_args, **_) -> list[str]:
    """`set UNIT <Tab>`: the unit's $params as NAME=, its @sets as @NAME+/-/=, mode= and the log limits."""
    from ..backends.bpf import PinnedUnit

    params, sets, interfaces = [], [], []
    unit = getattr(parsed_args, "unit", None)
    if unit:
        try:
            with PinnedUnit.open(pin_root(parsed_args), unit) as u:
                params, sets = list(u.meta["params"]), list(u.meta["sets"])
                interfaces = ["interfaces"] if u.interfaces else []  # ifname's names matched again
        except QUIET:
            pass
    words = [f"{p}=" for p in params] + [f"@{s}{op}" for s in sets for op in "+-="] + interfaces
    words += ["mode=enforce", "mode=audit", "log_rate=", "log_burst="]
    return [w for w in words if w.startswith(prefix)]


def autocomplete(parser) -> None:
    """Answer the shell's completion request and exit, when this run is one; else return."""
    import os

    if "_ARGCOMPLETE" not in os.environ:  # set by the shell hook (README: Environment variables)
        return
    try:
        import argcomplete
    except ImportError:  # no candidates without the library (Debian: python3-argcomplete)
        raise SystemExit(1) from None
    argcomplete.autocomplete(parser, always_complete_options=False)  # options once a "-" is typed
