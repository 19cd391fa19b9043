"""`bpfwall metrics`: every unit's counters (both backends) in the Prometheus text format, on
stdout or written atomically for node_exporter's textfile collector (--textfile)."""
from __future__ import annotations

import os
import sys

from ..errors import UsageError
from .options import cache_dir, pin_root, table


def register(add) -> None:
    p = add("metrics", "print every unit's counters (both backends) as Prometheus metrics")
    p.add_argument("--textfile", metavar="PATH",
                   help="write them to PATH atomically (a temporary file beside it, renamed) instead, e.g. "
                        "/var/lib/prometheus/node-exporter/bpfwall.prom for node_exporter's textfile collector")
    p.set_defaults(handler=cmd_metrics)


def note(text: str) -> None:
    print(f"bpfwall: note: {text}", file=sys.stderr)


def cmd_metrics(args) -> None:
    from .. import backends, metrics

    reg = metrics.registry(backends.every(pin_root=pin_root(args), table=table(args), cache=cache_dir(args)), note)
    if args.textfile is None:
        sys.stdout.write(metrics.prometheus().generate_latest(reg).decode())
        return
    directory = os.path.dirname(os.path.abspath(args.textfile))
    if not args.textfile.endswith(".prom") or os.path.isdir(args.textfile):
        raise UsageError(f"--textfile {args.textfile}: name a file ending in .prom (what the textfile collector reads)")
    if not os.path.isdir(directory):
        raise UsageError(f"--textfile {args.textfile}: no directory {directory}")
    metrics.prometheus().write_to_textfile(args.textfile, reg)
