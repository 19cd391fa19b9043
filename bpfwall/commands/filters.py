"""A unit's filters on the chosen backend (--backend; bpf by default): load, attach, detach,
unload, list, stats, set; and, for pinned BPF programs only, path and pin."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from . import completion
from .common import emit, filter_program, param_values, set_values
from .options import backend, filter_options, log_limit, log_value, unit_argument

DIRECTION_CHOICES = ("ingress", "egress")
CGROUP_HELP = "a cgroup: absolute, or relative to the cgroup2 mount (e.g. system.slice/nginx.service)"


def register(add) -> None:
    p = add("load", "compile, load and pin a unit's filters (replaces them in place if loaded)", True)
    unit_argument(p, "the unit the filters are for (their name; attach puts them on cgroups)")
    filter_options(p, "load")
    p.set_defaults(handler=cmd_load)

    for name, help, handler in (("attach", "attach a unit's filters to a cgroup (they filter the cgroups below it too)",
                                 cmd_attach),
                                ("detach", "detach a unit's filters from a cgroup", cmd_detach)):
        p = add(name, help, True)
        unit_argument(p, "a loaded unit")
        p.add_argument("cgroup", help=CGROUP_HELP)
        p.set_defaults(handler=handler)

    p = add("path", "print where a unit's program is (or would be) pinned", True)
    unit_argument(p)
    p.add_argument("direction", choices=DIRECTION_CHOICES, help="which of its two programs")
    p.set_defaults(handler=cmd_path)

    p = add("pin", "also pin a unit's program at PATH (e.g. /sys/fs/bpf/NAME)")
    unit_argument(p, "a loaded unit")
    p.add_argument("direction", choices=DIRECTION_CHOICES, help="which of its two programs")
    p.add_argument("path", help="the new pin, on a bpffs (replaced if it exists)")
    p.set_defaults(handler=cmd_pin)

    p = add("unload", "detach a unit's filters everywhere and remove them (--all: every unit's)", True)
    unit_argument(p, "a loaded unit", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="every loaded unit of both backends (of --backend, if given); the package's removal "
                        "runs it")
    p.set_defaults(handler=cmd_unload)

    p = add("list", "list loaded units", True)
    p.set_defaults(handler=cmd_list)

    p = add("stats", "show a unit's counters, mode, params, sets and attachments", True)
    unit_argument(p, "a loaded unit")
    p.add_argument("--watch", nargs="?", const=1.0, type=interval, metavar="SECONDS",
                   help="print packet and byte rates every SECONDS (default 1) until interrupted; "
                        "with --json one object per line")
    p.set_defaults(handler=cmd_stats)

    p = add("set", "change params, sets or mode live: name=VALUE, @set+E,.., @set-E,.., @set=E,.., mode=audit", True)
    unit_argument(p, "a loaded unit")
    p.add_argument("changes", nargs="+", metavar="CHANGE",
                   help="NAME=VALUE (a $param), mode=enforce|audit, log_rate=N, log_burst=N (drop events per second, burst), @SET+E1,E2 (add), @SET-E1,E2 (remove), "
                        "@SET=E1,E2 (replace), interfaces (look ifname's names up again among the devices now); "
                        "all are checked before the first is made"
                   ).completer = completion.changes  # Tab: the loaded unit's params and sets
    p.set_defaults(handler=cmd_set)


def cmd_load(args) -> None:
    unit_program = filter_program(args, "load")
    params, sets = param_values(args), set_values(args, unit_program)
    result = backend(args).load(args.unit, unit_program, params, sets, args.mode, log=log_limit(args))
    lines = [f"loaded {args.unit}"] + [f"  {d}: {place}" for d, place in result.places.items()]
    if result.replaced:
        lines.append(f"  replaced in place on {len(result.replaced)} attachment(s)")
    if result.attached:
        lines.append(f"  newly attached: {len(result.attached)}")
    if result.detached:
        lines.append(f"  detached: {len(result.detached)}")
    emit(args, {"unit": args.unit, **result.details,
                "replaced": [{"cgroup": c, "direction": d} for c, d in result.replaced],
                "attached": [{"cgroup": c, "direction": d} for c, d in result.attached],
                "detached": [{"cgroup": c, "direction": d} for c, d in result.detached]}, "\n".join(lines))


def cmd_attach(args) -> None:
    done = backend(args).attach(args.unit, args.cgroup)
    words = [f"{d} {'attached' if new else 'already attached'}" for d, new in done.items()]
    emit(args, {"unit": args.unit, "cgroup": args.cgroup, "attached": done},
         f"{args.unit} → {args.cgroup}: " + ", ".join(words))


def cmd_detach(args) -> None:
    done = backend(args).detach(args.unit, args.cgroup)
    words = [f"{d} {'detached' if gone else 'was not attached'}" for d, gone in done.items()]
    emit(args, {"unit": args.unit, "cgroup": args.cgroup, "detached": done},
         f"{args.unit} ✕ {args.cgroup}: " + ", ".join(words))


def cmd_path(args) -> None:
    from ..backends import programs

    path = programs(backend(args), "path").prog_path(args.unit, args.direction)
    emit(args, {"unit": args.unit, "direction": args.direction, "path": path}, path)


def cmd_pin(args) -> None:
    from ..backends import programs

    source = programs(backend(args), "pin").pin(args.unit, args.direction, args.path)
    print(f"{args.path} → {source}")


def cmd_unload(args) -> None:
    if args.all == (args.unit is not None):
        raise UsageError("unload: give a UNIT or --all")
    if args.all:
        return unload_all(args)
    detached = backend(args).unload(args.unit)
    emit(args, {"unit": args.unit, "detached": [{"cgroup": c, "direction": d} for c, d in detached]},
         f"unloaded {args.unit}" + (f" (detached from {len(detached)} attachment(s))" if detached else ""))


def unload_all(args) -> None:
    """Every unit of each backend; a backend that cannot run here (nft without python3-nftables)
    has loaded nothing and is skipped with a note, unless it was asked for by --backend."""
    from ..backends import NAMES
    from ..errors import Error

    chosen = getattr(args, "backend", None)
    done, failed, skipped = [], [], []
    for name in [chosen] if chosen else NAMES:
        b = backend(args, name)
        try:
            units = [row["unit"] for row in b.summary()]
        except Error as e:
            if chosen:
                raise
            skipped.append({"backend": name, "reason": str(e)})
            continue
        for unit in units:
            try:
                detached = b.unload(unit)
            except Error as e:
                failed.append({"backend": name, "unit": unit, "error": str(e)})
                continue
            done.append({"backend": name, "unit": unit, "detached": len(detached)})
    lines = [f"unloaded {d['unit']} ({d['backend']}, detached from {d['detached']} attachment(s))" for d in done]
    lines += [f"skipped the {s['backend']} backend: {s['reason']}" for s in skipped]
    emit(args, {"unloaded": done, "failed": failed, "skipped": skipped}, "\n".join(lines) or "no units loaded")
    if failed:
        raise Error(f"could not unload {len(failed)} unit(s): "
                    + "; ".join(f"{f['unit']} ({f['backend']}): {f['error']}" for f in failed))


def cmd_list(args) -> None:
    rows = backend(args).summary()
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['unit']}: {r['error']}")
            continue
        lines.append(f"{r['unit']} [{r['mode']}] {describe_attachments(r['attached'])}")
        for d in DIRECTION_CHOICES:
            if r[d] is not None:
                lines.append(f"  {d}: {r[d]}")
        if "compiler" in r:  # bpf units: what compiled the programs
            lines.append(f"  compiler: {r['compiler']}")
    emit(args, rows, "\n".join(lines) or "no units loaded")


def describe_attachments(attached: list[dict]) -> str:
    """Where a unit runs, as the kernel says, each cgroup once with its directions:
    `/sys/fs/cgroup/x (ingress, egress)`. A program of the unit that is not the one its pins name
    now (a load cut short, a crash) is shown as such, never hidden."""
    by_cgroup: dict[str, list[str]] = {}
    for a in sorted(attached, key=lambda a: DIRECTION_CHOICES.index(a["direction"])):
        text = a["direction"]
        if a.get("current") is False:
            text += f" [stale program id {a['program']}, not the pinned one: run bpfwall load again]"
        by_cgroup.setdefault(a["cgroup"], []).append(text)
    return ", ".join(f"{cg} ({', '.join(ds)})" for cg, ds in by_cgroup.items()) or "not attached"


def interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0.05 <= seconds <= 86400:  # also false for nan
        raise argparse.ArgumentTypeError(f"{text!r}: seconds between reads, from 0.05 to 86400")
    return seconds


def cmd_stats(args) -> None:
    if args.watch is not None:
        from .stats_watch import watch

        return watch(backend(args), args.unit, args.watch, getattr(args, "json", False))
    s = backend(args).stats(args.unit)
    lines = [f"{s['unit']} [{s['mode']}]"]
    for d in DIRECTION_CHOICES:
        if s[d] is None:
            continue
        c = s["counters"][d]
        drop = "would drop" if s["mode"] == "audit" else "drop"
        lines.append(f"  {d}: {s[d]}")
        lines.append(f"    pass {c['pass']['packets']} packets {c['pass']['bytes']} bytes, "
                     f"{drop} {c['drop']['packets']} packets {c['drop']['bytes']} bytes")
    if "compiler" in s:
        lines.append(f"  compiler: {s['compiler']}")
    for name, value in s["params"].items():
        lines.append(f"  ${name} = {value}")
    for name, elements in s["sets"].items():
        lines.append(f"  @{name} = {{{', '.join(elements)}}}")
    if "events" in s:
        ev = s["events"]
        state = f"up to {ev['log_rate']}/s, burst {ev['log_burst']}" if ev["log_rate"] else "off"
        lines.append(f"  drop events: {state}; lost: ingress {ev['lost']['ingress']}, egress {ev['lost']['egress']}")
    lines.append(f"  attached: {describe_attachments(s['attached'])}")
    emit(args, s, "\n".join(lines))


def parse_change(text: str):
    """name=value | mode=M | log_rate=N | log_burst=N | @set+E,.. | @set-E,.. | @set=E,.. | interfaces"""
    if text == "interfaces":
        return ("interfaces",)
    if text.startswith("@"):
        for i, ch in enumerate(text):
            if ch in "+-=":
                return ("set", text[1:i], ch, text[i + 1:])
        raise UsageError(f"{text!r}: write @set+ELEMENTS, @set-ELEMENTS or @set=ELEMENTS")
    name, eq, value = text.partition("=")
    if not eq:
        raise UsageError(f"{text!r}: write NAME=VALUE, mode=enforce|audit or @set+ELEMENTS")
    if name == "mode":
        if value not in ("enforce", "audit"):
            raise UsageError(f"mode={value}: mode is enforce or audit")
        return ("mode", value)
    if name in ("log_rate", "log_burst"):
        return ("log", name, log_value(name, value))
    from ..lang.values import parse_param_assignment

    return ("param",) + parse_param_assignment(text)


def cmd_set(args) -> None:
    changes = [parse_change(c) for c in args.changes]
    done = backend(args).set_values(args.unit, changes)
    emit(args, {"unit": args.unit, "done": done}, "\n".join(done))
