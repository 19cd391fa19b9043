"""Unit entries with nearer entries below them, on backends whose filters run below.

The nearest entry up the tree judges a packet, and only it (policy/judge.py). On bpf the kernel
runs every program from a socket's cgroup up to the root, and all must pass: a unit entry on a
delegated unit (`user@1000.service`) whose cgroups hold a slice with a default (`app.slice`) or a
user unit with its own entry would AND its verdict with theirs. So the watcher builds such a unit
entry as a guard (Entry.guards_nested): like a slice default's, its program passes untouched what
the watcher classifies as judged below, and judges the rest.

Only a tree shows it (a unit is delegated or not), so the watcher finds it as cgroups come and
rebuilds the entry then; until it has, the two filters AND (fails closed). The mark stays with
the entry's pins (its program is a guard), so a restart builds it as a guard at once, and so does
`bpfwall apply` (Backend.built_as_guard).
"""
from __future__ import annotations

import os
from dataclasses import replace

from ..policy.match import Policy


def with_nesting(policy: Policy, names: set[str]) -> Policy:
    """The policy with the unit entries `names` built as guards."""
    if not names & {e.name for e in policy.entries if not e.is_slice_default}:
        return policy
    return Policy([replace(e, guards_nested=True) if e.name in names and not e.is_slice_default else e
                   for e in policy.entries])


def nesting_from_pins(policy: Policy, owned: dict, built_as_guard) -> set[str]:
    """The unit entries whose loaded filter is a guard (`built_as_guard(entry)`: the watcher made it
    one before, its pins say so): built so again, without a window of ANDed verdicts after a
    restart, also when the entry's filter changed meanwhile. An entry recorded (`owned`: the
    watcher's state) with its plain fingerprint was loaded plain: its pins are not read, so an
    ordinary restart reads none."""
    return {e.name for e in policy.entries if not e.is_slice_default
            and ((record := owned.get(e.name)) is None or record.fingerprint != e.fingerprint())
            and built_as_guard(e)}


def entries_to_nest(path: str, name: str, root: str, attached: dict[str, str], units: dict) -> set[str]:
    """`path` carries entry `name`'s filter: the entries attached above it whose filters run
    below it too and are no guards (their verdict would AND with this nearer one)."""
    found = set()
    p = os.path.dirname(path)
    while len(p) > len(root) and p.startswith(root):
        above = attached.get(p)
        handle = units.get(above) if above is not None else None
        if handle is not None and above != name and handle.runs_below and not handle.guards:
            found.add(above)
        p = os.path.dirname(p)
    return found
