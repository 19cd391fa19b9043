"""The nft backend on the command line.

`--backend nft` (or BPFWALL_BACKEND=nft) makes load, attach, detach, stats, set,
unload, list and explain work on the nft table `--table NAME` (BPFWALL_NFT_TABLE,
default "bpfwall"), through the backend the factory builds. This module also
adds two commands:

    nft-guard     watch the ruleset; restore the table when it is flushed or deleted
    nft-restore   rebuild the table from its state file now
"""
from __future__ import annotations

import sys

from .common import emit
from .options import backend, table

def cmd_guard(args) -> None:
    from ..backends.nft import default_table
    from ..nft.guard import Guard

    name = table(args) or default_table()

    def restored(r):
        print(f"restored table inet {r.table}", file=sys.stderr, flush=True)

    def failed(message):
        print(f"cannot restore table inet {name}: {message}", file=sys.stderr, flush=True)

    guard = Guard(name, on_restore=restored, on_error=failed)
    print(f"guarding table inet {name}", file=sys.stderr, flush=True)
    try:
        guard.run()
    except KeyboardInterrupt:
        pass
    finally:
        guard.close()


def cmd_restore(args) -> None:
    done = backend(args, "nft").restore()
    emit(args, done, f"restored table inet {done['table']}: {len(done['units'])} unit(s), "
                     f"{done['attached']} attachment(s)")


def register(add) -> None:
    p = add("nft-guard", "keep the nft table in place: restore it (with every attachment) after "
                         "`nft flush ruleset` or its deletion; runs until interrupted")
    p.set_defaults(handler=cmd_guard)
    p = add("nft-restore", "rebuild the nft table from its state file", json_output=True)
    p.set_defaults(handler=cmd_restore)
