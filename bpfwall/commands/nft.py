"""The nft backend on the command line.

`--backend nft` (or BPFWALL_BACKEND=nft) makes load, attach, detach, stats, set,
unload, list and explain work on the nft table `--table NAME` (BPFWALL_NFT_TABLE,
default "bpfwall"), through the backend the factory builds. This module also
adds two commands:

    nft-guard     watch the ruleset; restore the table when it is flushed or deleted
    nft-restore   rebuild the table from its state file now
"""
from __future__ import annotations

import json
import os
import sys

from ..errors import UserError

BACKENDS = ("bpf", "nft")


def backend(args) -> str:
    name = getattr(args, "backend", None) or os.environ.get("BPFWALL_BACKEND") or "bpf"
    if name not in BACKENDS:
        raise UserError(f"backend {name!r} (from BPFWALL_BACKEND): choose bpf or nft")
    return name


def table(args) -> str:
    from ..backends.nft import default_table

    return getattr(args, "table", None) or default_table()


def add_options(p) -> None:
    """--backend and --table, for the common options of every command."""
    import argparse

    p.add_argument("--backend", choices=BACKENDS, default=argparse.SUPPRESS,
                   help="bpf (cgroup_skb programs, the default) or nft (socket cgroupv2 verdict maps); "
                        "default $BPFWALL_BACKEND or bpf")
    p.add_argument("--table", metavar="NAME", default=argparse.SUPPRESS,
                   help="nft table of the nft backend (default $BPFWALL_NFT_TABLE or bpfwall)")


# -- new commands ---------------------------------------------------------------------------------

def cmd_guard(args) -> None:
    from ..nft.guard import Guard

    name = table(args)

    def restored(t):
        print(f"restored table inet {t}", file=sys.stderr, flush=True)

    guard = Guard(name, on_restore=restored)
    print(f"guarding table inet {name}", file=sys.stderr, flush=True)
    try:
        guard.run_forever()
    except KeyboardInterrupt:
        pass


def cmd_restore(args) -> None:
    from ..backends import create

    done = create("nft", table=table(args)).restore()
    if getattr(args, "json", False):
        print(json.dumps(done, indent=2, sort_keys=True))
    else:
        print(f"restored table inet {done['table']}: {len(done['units'])} unit(s), {done['attached']} attachment(s)")


def register(add) -> None:
    p = add("nft-guard", "keep the nft table in place: restore it (with every attachment) after "
                         "`nft flush ruleset` or its deletion; runs until interrupted")
    p.set_defaults(handler=cmd_guard)
    p = add("nft-restore", "rebuild the nft table from its state file", json_output=True)
    p.set_defaults(handler=cmd_restore)
