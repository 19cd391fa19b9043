"""`bpfwall gc`: remove what `bpfwall run`s that were killed left behind (see bpfwall/leftovers.py)."""
from __future__ import annotations


def register(add) -> None:
    p = add("gc", "remove the pins and cgroups that killed `bpfwall run`s left behind "
                  "(never those of a run or command still alive)", True)
    p.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    p.set_defaults(handler=cmd_gc)


def cmd_gc(args) -> None:
    from .. import leftovers
    from .common import emit
    from .options import pin_root

    outcomes = leftovers.collect(pin_root(args), dry_run=args.dry_run)
    emit(args, [o.as_json() for o in outcomes],
         "\n".join(o.line() for o in outcomes) or "no leftovers of killed bpfwall runs")
