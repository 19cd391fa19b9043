"""The `bpfwall` command.

Every error is reported the same way: `bpfwall: error: <one line>` on stderr
(for an expression, followed by the expression with a caret under the
column), exit status 2, and nothing changed in the kernel — all input is
checked before the first bpf(2) call that changes state.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_ERROR = 2


class UsageError(Exception):
    """Bad command-line input found by the CLI itself."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _common(json_output: bool = False) -> argparse.ArgumentParser:
    """Options accepted before or after the command name."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--pin-root", default=argparse.SUPPRESS,
                   help="bpffs directory for pins (default $BPFWALL_PIN_ROOT or /sys/fs/bpf/bpfwall)")
    p.add_argument("--cache-dir", default=argparse.SUPPRESS,
                   help="compiled-object cache (default $BPFWALL_CACHE_DIR or ~/.cache/bpfwall)")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    from .commands import nft as nft_cli

    nft_cli.add_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    common, common_json = _common(), _common(json_output=True)
    parser = _Parser(prog="bpfwall", parents=[common],
                     description="A per-unit eBPF firewall for systemd units.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name, help, json_output=False):
        return sub.add_parser(name, help=help, description=help,
                              parents=[common_json if json_output else common])

    p = add("check", "validate an expression and print it normalized", True)
    p.add_argument("expr")

    p = add("explain", "show the C emitted for an expression", True)
    p.add_argument("expr")
    p.add_argument("--direction", choices=("ingress", "egress"), help="only this direction's filter")

    p = add("test", "run packets through the compiled filter in the kernel (BPF_PROG_TEST_RUN)", True)
    p.add_argument("expr")
    p.add_argument("--direction", choices=("ingress", "egress"), default="ingress")
    _values(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hex", nargs="+", metavar="HEX", help="packets: raw L3 bytes from the IP header, in hex")
    src.add_argument("--packets", metavar="FILE", help="file with one hex packet per line ('-' = stdin)")

    p = add("load", "compile, load and pin a unit's filters (replaces them in place if loaded)", True)
    p.add_argument("unit")
    p.add_argument("--ingress", metavar="EXPR")
    p.add_argument("--egress", metavar="EXPR")
    _values(p)
    p.add_argument("--mode", choices=("enforce", "audit"))
    capacity_options(p)

    for name, help in (("attach", "attach a unit's programs to a cgroup (ALLOW_MULTI)"),
                       ("detach", "detach a unit's programs from a cgroup")):
        p = add(name, help, True)
        p.add_argument("unit")
        p.add_argument("cgroup", help="absolute, or relative to the cgroup2 mount")

    p = add("path", "print where a unit's program is (or would be) pinned", True)
    p.add_argument("unit")
    p.add_argument("direction", choices=("ingress", "egress"))

    p = add("pin", "also pin a unit's program at PATH (e.g. /sys/fs/bpf/NAME)")
    p.add_argument("unit")
    p.add_argument("direction", choices=("ingress", "egress"))
    p.add_argument("path")

    p = add("unload", "detach a unit's programs everywhere and remove its pins", True)
    p.add_argument("unit")

    add("list", "list loaded units", True)

    p = add("stats", "show a unit's counters, mode, params, sets and attachments", True)
    p.add_argument("unit")

    p = add("set", "change params, sets or mode live: name=VALUE, @set+E,.., @set-E,.., @set=E,.., mode=audit", True)
    p.add_argument("unit")
    p.add_argument("changes", nargs="+", metavar="CHANGE")

    from .commands import register_all

    register_all(add)
    return parser


def capacity_options(p: argparse.ArgumentParser) -> None:
    from .capacity import UNFORCED_LIMIT, show_bytes

    p.add_argument("--set-capacity", type=int, metavar="N", help="elements each @set can hold (default 4096)")
    p.add_argument("--force-capacity", action="store_true",
                   help=f"allow a --set-capacity whose sets take more than {show_bytes(UNFORCED_LIMIT)} "
                        "of kernel memory")


def _values(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--set", action="append", default=[], metavar="NAME=E1,E2")


# -- helpers ------------------------------------------------------------------

def _pin_root(args) -> str:
    from .backends.bpf import DEFAULT_PIN_ROOT

    return getattr(args, "pin_root", None) or os.environ.get("BPFWALL_PIN_ROOT") or DEFAULT_PIN_ROOT


def _cache(args):
    from pathlib import Path

    value = getattr(args, "cache_dir", None)
    return Path(value) if value else None


def _analyze(text: str):
    from .lang.checker import analyze

    return analyze(text)


def _program(args, ingress: str | None, egress: str | None):
    from .build import DEFAULT_SET_CAPACITY, UnitProgram
    from .lang.checker import analyze_pair

    from .capacity import check

    capacity = getattr(args, "set_capacity", None)
    capacity = DEFAULT_SET_CAPACITY if capacity is None else capacity
    ingress_checked, egress_checked = analyze_pair(ingress, egress)
    program = UnitProgram(ingress_checked, egress_checked, capacity)
    check(program.sets, capacity, getattr(args, "force_capacity", False), f"--set-capacity {capacity}",
          "--force-capacity")
    return program


def _param_values(args) -> dict[str, int]:
    from .lang.values import parse_param_assignment

    return dict(parse_param_assignment(a) for a in args.param)


def _set_values(args, program) -> dict[str, list]:
    from .lang.values import parse_set_assignment, parse_set_elements

    out = {}
    for a in args.set:
        name, raw = parse_set_assignment(a)
        kind = program.sets.get(name)
        if kind is None:
            have = ", ".join("@" + s for s in sorted(program.sets)) or "none"
            raise UsageError(f"--set {name}: the filter has no set @{name} (its sets: {have})")
        out[name] = parse_set_elements(name, kind, raw)
    return out


def _read_packets(args) -> list[bytes]:
    if args.hex:
        lines = [(f"--hex #{i + 1}", h) for i, h in enumerate(args.hex)]
    else:
        try:
            f = sys.stdin if args.packets == "-" else open(args.packets)
        except OSError as e:
            raise UsageError(f"--packets {args.packets}: {e.strerror}") from None
        with f:
            lines = [(f"{args.packets}:{n}", line.split("#", 1)[0].strip())
                     for n, line in enumerate(f, 1)]
        lines = [(where, text) for where, text in lines if text]
        if not lines:
            raise UsageError(f"--packets {args.packets}: no packets in it")
    from .lang.errors import PacketError
    from .lang.packet import parse_packet

    packets = []
    for where, text in lines:
        try:
            data = bytes.fromhex(text.replace(":", " "))
        except ValueError:
            raise UsageError(f"{where}: not a hex packet: {text[:40]!r}") from None
        try:
            parse_packet(data)
        except PacketError as e:
            raise UsageError(f"{where}: {e}") from None
        packets.append(data)
    return packets


def _emit(args, data, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text:
        print(text)


# -- commands -----------------------------------------------------------------

def cmd_check(args) -> None:
    checked = _analyze(args.expr)
    _emit(args, {"expression": checked.text, "params": list(checked.params), "sets": checked.sets},
          checked.text)


def cmd_explain(args) -> None:
    checked = _analyze(args.expr)
    data, text = _backend(args).explain(checked, args.direction)
    _emit(args, data, text)


def cmd_test(args) -> None:
    from .backends import programs

    backend = programs(_backend(args), "test")
    from .lang.evaluator import evaluate
    from .lang.packet import as_dict, parse_packet

    program = _program(args, args.expr if args.direction == "ingress" else None,
                       args.expr if args.direction == "egress" else None)
    params, sets = _param_values(args), _set_values(args, program)
    packets = _read_packets(args)
    verdicts = backend.test_run(program, args.direction, packets, params, sets)
    checked = program.ingress or program.egress
    rows = []
    for i, (data, verdict) in enumerate(zip(packets, verdicts)):
        fields = parse_packet(data)
        reference = evaluate(checked.expr, fields, args.direction, params, sets)
        rows.append({"index": i, "verdict": "pass" if verdict else "drop",
                     "reference": "pass" if reference else "drop", "agree": verdict == reference,
                     "fields": as_dict(fields)})
    _emit(args, {"expression": checked.text, "direction": args.direction, "packets": rows},
          "\n".join(r["verdict"] for r in rows))


def cmd_load(args) -> None:
    if args.ingress is None and args.egress is None:
        raise UsageError("load: give --ingress EXPR, --egress EXPR or both")
    backend = _backend(args)
    program = _program(args, args.ingress, args.egress)
    params, sets = _param_values(args), _set_values(args, program)
    result = backend.load(args.unit, program, params, sets, args.mode)
    lines = [f"loaded {args.unit}"] + [f"  {d}: {place}" for d, place in result.places.items()]
    if result.replaced:
        lines.append(f"  replaced in place on {len(result.replaced)} attachment(s)")
    if result.attached:
        lines.append(f"  newly attached: {len(result.attached)}")
    if result.detached:
        lines.append(f"  detached: {len(result.detached)}")
    _emit(args, {"unit": args.unit, **result.details,
                 "replaced": [{"cgroup": c, "direction": d} for c, d in result.replaced],
                 "attached": [{"cgroup": c, "direction": d} for c, d in result.attached],
                 "detached": [{"cgroup": c, "direction": d} for c, d in result.detached]}, "\n".join(lines))


def cmd_attach(args) -> None:
    done = _backend(args).attach(args.unit, args.cgroup)
    words = [f"{d} {'attached' if new else 'already attached'}" for d, new in done.items()]
    _emit(args, {"unit": args.unit, "cgroup": args.cgroup, "attached": done},
          f"{args.unit} → {args.cgroup}: " + ", ".join(words))


def cmd_detach(args) -> None:
    done = _backend(args).detach(args.unit, args.cgroup)
    words = [f"{d} {'detached' if gone else 'was not attached'}" for d, gone in done.items()]
    _emit(args, {"unit": args.unit, "cgroup": args.cgroup, "detached": done},
          f"{args.unit} ✕ {args.cgroup}: " + ", ".join(words))


def cmd_path(args) -> None:
    from .backends import programs

    path = programs(_backend(args), "path").prog_path(args.unit, args.direction)
    _emit(args, {"unit": args.unit, "direction": args.direction, "path": path}, path)


def cmd_pin(args) -> None:
    from .backends import programs

    source = programs(_backend(args), "pin").pin(args.unit, args.direction, args.path)
    print(f"{args.path} → {source}")


def cmd_unload(args) -> None:
    detached = _backend(args).unload(args.unit)
    _emit(args, {"unit": args.unit, "detached": [{"cgroup": c, "direction": d} for c, d in detached]},
          f"unloaded {args.unit}" + (f" (detached from {len(detached)} attachment(s))" if detached else ""))


def cmd_list(args) -> None:
    rows = _backend(args).summary()
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"{r['unit']}: {r['error']}")
            continue
        lines.append(f"{r['unit']} [{r['mode']}] {describe_attachments(r['attached'])}")
        for d in ("ingress", "egress"):
            if r[d] is not None:
                lines.append(f"  {d}: {r[d]}")
    _emit(args, rows, "\n".join(lines) or "no units loaded")


def describe_attachments(attached: list[dict]) -> str:
    """Where a unit runs, as the kernel says: a program of the unit that is not the one its pins
    name now (a load cut short, a crash) is shown as such, never hidden."""
    def one(a: dict) -> str:
        text = f"{a['cgroup']} ({a['direction']})"
        if a.get("current") is False:
            text += f" [stale program id {a['program']}, not the pinned one: run bpfwall load again]"
        return text
    return ", ".join(one(a) for a in attached) or "not attached"


def cmd_stats(args) -> None:
    s = _backend(args).stats(args.unit)
    lines = [f"{s['unit']} [{s['mode']}]"]
    for d in ("ingress", "egress"):
        if s[d] is None:
            continue
        c = s["counters"][d]
        drop = "would drop" if s["mode"] == "audit" else "drop"
        lines.append(f"  {d}: {s[d]}")
        lines.append(f"    pass {c['pass']['packets']} packets {c['pass']['bytes']} bytes, "
                     f"{drop} {c['drop']['packets']} packets {c['drop']['bytes']} bytes")
    for name, value in s["params"].items():
        lines.append(f"  ${name} = {value}")
    for name, elements in s["sets"].items():
        lines.append(f"  @{name} = {{{', '.join(elements)}}}")
    lines.append(f"  attached: {describe_attachments(s['attached'])}")
    _emit(args, s, "\n".join(lines))


def _parse_change(text: str):
    """name=value | mode=M | @set+E,.. | @set-E,.. | @set=E,.."""
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
    from .lang.values import parse_param_assignment

    return ("param",) + parse_param_assignment(text)


def cmd_set(args) -> None:
    changes = [_parse_change(c) for c in args.changes]
    done = _backend(args).set_values(args.unit, changes)
    _emit(args, {"unit": args.unit, "done": done}, "\n".join(done))


def _backend(args):
    """The backend the global options choose (--backend, $BPFWALL_BACKEND; bpf by default)."""
    from .backends import create
    from .commands import nft as nft_cli

    return create(nft_cli.backend(args), pin_root=_pin_root(args), table=nft_cli.table(args), cache=_cache(args))


COMMANDS = {
    "check": cmd_check, "explain": cmd_explain, "test": cmd_test, "load": cmd_load,
    "attach": cmd_attach, "detach": cmd_detach, "path": cmd_path, "pin": cmd_pin,
    "unload": cmd_unload, "list": cmd_list, "stats": cmd_stats, "set": cmd_set,
}


def _error_lines(exc: BaseException) -> list[str]:
    from .lang.errors import LangError

    if isinstance(exc, LangError):
        lines = exc.render().splitlines() if exc.text is not None else [str(exc)]
        if exc.direction:
            lines[0] = f"--{exc.direction}: {lines[0]}"
        return lines
    return [str(exc).splitlines()[0] if str(exc) else type(exc).__name__]


def main(argv=None) -> int:
    from .backends.bpf import BackendError
    from .build import BuildError
    from .errors import UserError
    from .kernel.errors import KernelError
    from .lang.errors import LangError
    from .unitkey import UnitNameError

    try:
        args = build_parser().parse_args(argv)
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        handler(args)
        return 0
    except (UsageError, UserError, LangError, KernelError, BackendError, BuildError, UnitNameError) as e:
        lines = _error_lines(e)
        print(f"bpfwall: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        # Inputs are counted before anything is enumerated; this is the last line of defence.
        print("bpfwall: error: out of memory: the request needs more memory than bpfwall may use here",
              file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
