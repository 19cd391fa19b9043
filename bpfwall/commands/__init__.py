"""Every command, by topic; cli.py only builds the parser from them and runs one.

    language  check, explain, test, help        filters  load, attach, detach, path, pin,
    unit      apply, dropin, run                         unload, list, stats, set
    systemd   import-systemd
    tune      tune (the terminal UI, bpfwall/tune/)
    monitor   monitor (drop events, live)
    watch     watch                             policy   policy check|show|match, import-scnpm
    metrics   metrics (Prometheus)
    nft       nft-guard, nft-restore            gc       gc
    options   the shared options, declared once, and what they resolve to
    common    printing results; the filter options → a checked program and its values

Each module listed in MODULES has `register(add)`, where
`add(name, help, json_output=False, **parser_kwargs)` returns an argparse
sub-parser; the module calls `p.set_defaults(handler=fn)` on every parser it adds,
and `fn(args)` runs the command. Errors derive from bpfwall.errors.Error.
"""
import importlib

MODULES = ("language", "filters", "tune", "monitor", "watch", "metrics", "policy", "unit", "systemd", "nft", "gc")  # in the order --help lists them


def register_all(add) -> None:
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}").register(add)
