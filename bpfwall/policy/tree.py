"""The cgroups that exist below a root, as `policy show --effective`, `policy match` and
`policy check`'s warnings see them: each one's path relative to the root and whether
processes run in it or below it (`populated 1` in its cgroup.events).

Only directory names and cgroup.events are read, and nothing read decides what gets
attached: a delegated subtree's owner may name cgroups as they like, so callers show the
names through safefs.show (control characters escaped).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..kernel import cgroup


@dataclass(frozen=True)
class Cgroup:
    rel: str          # relative to the root ("" for the root itself)
    path: str         # absolute
    populated: bool   # processes in it or in a cgroup below it


def root_of(cgroup_root: str | None) -> str:
    """The absolute root: --cgroup-root (absolute, or relative to the cgroup2 mount), else the mount."""
    return cgroup.resolve(cgroup_root) if cgroup_root else cgroup.cgroup2_mount()


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return any(line.strip() == "populated 1" for line in f)
    except OSError:
        return False  # gone meanwhile


def read_tree(root: str) -> list[Cgroup]:
    """Every cgroup below `root` (itself included), parents first."""
    return [Cgroup("" if p == root else os.path.relpath(p, root), p, populated(p)) for p in cgroup.walk(root)]
