"""Commands about expressions: check, explain, test, and `help language` (the reference)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..errors import UsageError
from .common import emit, param_values, program, set_values
from .options import backend, value_options

EXPR_HELP = "a filter expression, e.g. 'udp && dst_port == 53' (see `bpfwall help language`)"


def register(add) -> None:
    from ..lang.reference import reference

    p = add("check", "validate an expression and print it normalized", True,
            epilog="The language:\n\n" + reference(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("expr", help=EXPR_HELP)
    p.set_defaults(handler=cmd_check)

    p = add("explain", "show what an expression becomes: the C emitted (bpf) or the nft chains (nft)", True)
    p.add_argument("expr", help=EXPR_HELP)
    p.add_argument("--direction", choices=("ingress", "egress"),
                   help="only this direction's filter (default: both)")
    p.set_defaults(handler=cmd_explain)

    p = add("test", "run packets through the compiled filter in the kernel (BPF_PROG_TEST_RUN)", True)
    p.add_argument("expr", help=EXPR_HELP)
    p.add_argument("--direction", choices=("ingress", "egress"), default="ingress",
                   help="the direction the packets travel, which local_*/remote_* read (default: ingress)")
    value_options(p)
    p.add_argument("--ifname", default="lo", metavar="DEVICE",
                   help="the device the packets come by, which ifname reads: one of this host's (default: lo)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hex", nargs="+", metavar="HEX", help="packets: raw L3 bytes from the IP header, in hex")
    src.add_argument("--packets", metavar="FILE", help="file with one hex packet per line ('-' = stdin)")
    p.set_defaults(handler=cmd_test)

    p = add("help", "show help on a command, or the filter language: help [COMMAND | language]")
    p.add_argument("topic", nargs="?", metavar="TOPIC",
                   help="'language' for the language reference (fields, operators, sets, params), or a command")
    p.set_defaults(handler=cmd_help)


def cmd_check(args) -> None:
    from ..lang.checker import analyze

    checked = analyze(args.expr)
    emit(args, {"expression": checked.text, "params": list(checked.params), "sets": checked.sets},
         checked.text)


def cmd_explain(args) -> None:
    from ..lang.checker import analyze

    checked = analyze(args.expr)
    data, text = backend(args).explain(checked, args.direction)
    emit(args, data, text)


def cmd_test(args) -> None:
    from ..backends import programs
    from ..lang.evaluator import evaluate
    from ..lang.packet import as_dict, parse_packet

    kernel = programs(backend(args), "test")
    unit_program = program(args, args.expr if args.direction == "ingress" else None,
                           args.expr if args.direction == "egress" else None)
    params, sets = param_values(args), set_values(args, unit_program)
    named = read_packets(args)
    verdicts = kernel.test_run(unit_program, args.direction, [data for _, data in named], params, sets,
                               devices=[args.ifname] * len(named))
    checked = unit_program.ingress or unit_program.egress
    rows, lines, unjudged = [], [], 0
    for i, ((where, data), verdict) in enumerate(zip(named, verdicts, strict=True)):
        fields = parse_packet(data)
        reference = evaluate(checked.expr, replace(fields, ifname=args.ifname), args.direction, params, sets)
        row = {"index": i, "where": where, "reference": "pass" if reference else "drop",
               "fields": as_dict(fields)}
        if isinstance(verdict, bool):
            row.update(verdict="pass" if verdict else "drop", agree=verdict == reference)
            lines.append(row["verdict"])
        else:  # the kernel would not run it (PacketTooLong): say which packet and why
            unjudged += 1
            row.update(verdict=None, agree=None, error=str(verdict))
            lines.append(f"error: {where}: {verdict}")
        rows.append(row)
    emit(args, {"expression": checked.text, "direction": args.direction, "packets": rows},
         "\n".join(lines))
    if unjudged:
        raise UsageError(f"{unjudged} of {len(rows)} packets not judged (see above)")


def read_packets(args) -> list[tuple[str, bytes]]:
    """The packets of --hex or --packets, each checked to be an IPv4 or IPv6 packet, with where
    each was given (`--hex #2`, `FILE:7`)."""
    if args.hex:
        lines = [(f"--hex #{i + 1}", h) for i, h in enumerate(args.hex)]
    else:
        try:
            with sys.stdin if args.packets == "-" else open(args.packets) as f:
                lines = [(f"{args.packets}:{n}", line.split("#", 1)[0].strip())
                         for n, line in enumerate(f, 1)]
        except OSError as e:
            raise UsageError(f"--packets {args.packets}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--packets {args.packets}: not a text file of hex packets") from None
        lines = [(where, text) for where, text in lines if text]
        if not lines:
            raise UsageError(f"--packets {args.packets}: no packets in it")
    from ..lang.errors import PacketError
    from ..lang.packet import parse_packet

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
        packets.append((where, data))
    return packets


def cmd_help(args) -> None:
    from ..cli import build_parser
    from ..lang.reference import reference

    if args.topic == "language":
        print(reference())
        return
    parser = build_parser()
    if args.topic is None:
        parser.print_help()
        return
    commands = parser.commands
    if args.topic not in commands:
        raise UsageError(f"help {args.topic}: no such command or topic (topics: language; commands: "
                         f"{', '.join(sorted(commands))})")
    commands[args.topic].print_help()
