"""What `policy match` and `policy show --effective` show: which entry judges a cgroup, the
whole path up to the cgroup2 root with the entry and the programs on each ancestor, and the
judge of every existing cgroup.

Programs are found with BPF_PROG_QUERY on each ancestor (the kernel runs every one of them
for a socket below, and all must pass) and told apart by their kernel names: bpfwall's are
`bpfw_…` (a unit's `bpfw_i_<hash>`/`bpfw_e_<hash>`, named after the unit: backends/bpf.py),
systemd's `sd_…` (`sd_fw_ingress`, `sd_fw_egress`: IPAddressDeny=/IPAccounting=), anything
else is foreign and shown by id. Reading them needs root (CAP_NET_ADMIN to query,
CAP_SYS_ADMIN to read a name by id); without it the path is shown without programs, saying so.
"""
from __future__ import annotations

import os

from ..errors import Error
from ..kernel.safefs import show
from ..policy import judge
from ..policy.changes import drops_everything
from ..policy.judge import DIRECTIONS

BPFWALL_PREFIX, SYSTEMD_PREFIX = "bpfw_", "sd_"


def owner_of(name: str | None) -> str:
    if name is None:
        return "unknown"
    if name.startswith(BPFWALL_PREFIX):
        return "bpfwall"
    if name.startswith(SYSTEMD_PREFIX):
        return "systemd"
    return "foreign"


def _unit_programs(policy, pin_root: str) -> dict[str, str]:
    """Kernel program name → the policy entry whose program it is (as loaded under this pin root)."""
    from ..backends.bpf import program_name

    return {program_name(pin_root, e.name, d): e.name for e in policy.entries for d in DIRECTIONS}


def programs_on(path: str, units: dict[str, str]) -> dict[str, list[dict]]:
    """{direction: [{id, name, owner, entry}]} of the programs attached to the cgroup itself, in run order."""
    from ..backends.bpf import name_of
    from ..kernel import cgroup

    out = {}
    for d in DIRECTIONS:
        _, ids = cgroup.query(path, d)
        out[d] = []
        for pid in ids:
            name = name_of(pid)
            out[d].append({"id": pid, "name": name, "owner": owner_of(name), "entry": units.get(name or "")})
    return out


def _ancestors(mount: str, root: str, rel: str) -> list[tuple[str, str | None]]:
    """(absolute path, path relative to the policy's root or None above it) from the cgroup2 root down."""
    target = os.path.normpath(os.path.join(root, rel)) if rel else root
    parts = [p for p in os.path.relpath(target, mount).split("/") if p and p != "."]
    out = []
    for i in range(len(parts) + 1):
        path = os.path.join(mount, *parts[:i]) if i else mount
        inside = path == root or path.startswith(root.rstrip("/") + "/")
        out.append((path, (os.path.relpath(path, root) if path != root else "") if inside else None))
    return out


def path_view(policy, rel: str, mount: str | None, root: str | None, pin_root: str) -> dict:
    """Everything `policy match` shows (its --json): the judgement, and each ancestor with the
    entry sitting on it and its programs."""
    j = judge(policy, rel)
    report = policy.explain(rel)
    view = {**report.as_dict(), "judgement": j.as_dict(), "path": [], "programs_error": None}
    holders = {h.cgroup: h for h in j.holders}
    if mount is None or root is None:
        view["programs_error"] = "no cgroup2 mount here: the path is shown without programs"
        ancestors = [(None, "/".join(rel.split("/")[:i])) for i in range(len([p for p in rel.split("/") if p]) + 1)]
    elif not os.path.isdir(os.path.join(root, rel)):
        view["programs_error"] = f"{show(os.path.join(root, rel))} does not exist here: no programs to show"
        ancestors = [(None, "/".join(rel.split("/")[:i])) for i in range(len([p for p in rel.split("/") if p]) + 1)]
    else:
        ancestors = _ancestors(mount, root, rel)
    units = _unit_programs(policy, pin_root)
    for path, at in ancestors:
        h = holders.get(at) if at is not None else None
        row = {"path": path, "cgroup": at, "level": None if at is None else len([p for p in at.split("/") if p]),
               "entry": None if h is None else {"name": h.entry.name, "file": h.entry.file, "line": h.entry.line,
                                                "slice_default": h.is_slice_default},
               "programs": None}
        if path is not None and view["programs_error"] is None:
            try:
                row["programs"] = programs_on(path, units)
            except Error as e:
                view["programs_error"] = f"cannot list the programs on the path ({e}); run as root to see them"
        view["path"].append(row)
    return view


def render_path_view(view: dict) -> str:
    j = view["judgement"]
    lines = [view["cgroup"] or "/"]
    for d in DIRECTIONS:
        lines.append(f"  {d}: {j[d]['reason']}")
    if view["entry"] is not None:
        e = view["entry"]
        lines.append(f"  the entry on this cgroup: {e['name']} ({e['file']}:{e['line']}): {view['reason']}")
    else:
        lines.append(f"  no entry on this cgroup itself: {view['reason']}")
    for p in view["passed_over"]:
        lines.append(f"  passed over: {p['name']} ({p['file']}:{p['line']}): {p['why']}")
    lines.append("  the path, root first (for a socket here the kernel runs every program listed; each must pass):")
    width = max(len(show(r["cgroup"] if r["cgroup"] is not None else r["path"]) or "/") for r in view["path"])
    for r in view["path"]:
        name = show(r["cgroup"] if r["cgroup"] is not None else r["path"]) or "/"
        level = f"level {r['level']}" if r["level"] is not None else "above the policy's root"
        what = ""
        if r["entry"] is not None:
            kind = "slice default" if r["entry"]["slice_default"] else "entry"
            what = f"  {kind} {r['entry']['name']} ({r['entry']['file']}:{r['entry']['line']})"
        lines.append(f"    {name:<{width}}  {level}{what}")
        for d in DIRECTIONS:
            for p in (r["programs"] or {}).get(d, []):
                whose = p["owner"] + (f": {p['entry']}" if p["entry"] else "")
                lines.append(f"      {d:<7} id {p['id']} {show(p['name'] or '?')} ({whose})")
    if view["programs_error"]:
        lines.append(f"  ({view['programs_error']})")
    return "\n".join(lines)


def _judge_row(j, d: str) -> dict:
    h = j.judge(d)
    if h is None:
        return {"how": "none", "entry": None, "at": None, "drops_everything": False}
    return {"how": j.how(d), "entry": h.entry.name, "file": h.entry.file, "line": h.entry.line, "at": h.cgroup,
            "drops_everything": drops_everything(h.entry, d)}


def effective(policy, tree: list) -> list[dict]:
    """For every existing cgroup (tree.Cgroup), the entry that judges it in each direction."""
    out = []
    for c in tree:
        j = judge(policy, c.rel)
        out.append({"cgroup": c.rel, "populated": c.populated, **{d: _judge_row(j, d) for d in DIRECTIONS}})
    return out


def _describe(row: dict, cgroup: str) -> str:
    if row["entry"] is None:
        return "unpoliced"
    if row["how"] == "default":
        text = f"{row['entry']} (default of {show(row['at'])})"
    elif row["at"] == cgroup:
        text = f"{row['entry']} (own entry)"
    else:
        text = f"{row['entry']} (entry of {show(row['at'].rsplit('/', 1)[-1])})"
    return text + (": DROPS EVERYTHING" if row["drops_everything"] else "")


def render_effective(rows: list[dict], root: str) -> str:
    lines = [f"every cgroup below {show(root)} (* = processes run in it or below) and the entry that judges it:"]
    width = max((len(show(r["cgroup"]) or "/") + 2 for r in rows), default=0)
    for r in rows:
        name = (show(r["cgroup"]) or "/") + (" *" if r["populated"] else "")
        ingress, egress = _describe(r["ingress"], r["cgroup"]), _describe(r["egress"], r["cgroup"])
        judged = ingress if ingress == egress else f"ingress {ingress}; egress {egress}"
        lines.append(f"  {name:<{width}}  {judged}")
    return "\n".join(lines)
