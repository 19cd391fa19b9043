"""Command groups that live outside cli.py.

Each module listed in MODULES has `register(add)`, where
`add(name, help, json_output=False)` returns an argparse sub-parser; the
module calls `p.set_defaults(handler=fn)` on every parser it adds, and `fn(args)`
runs the command. Errors derive from bpfwall.errors.UserError.
"""
import importlib

MODULES = ("watch", "policy", "unit", "nft", "gc")  # e.g. ("policy", "watch"): filled in as command groups land


def register_all(add) -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(add)
