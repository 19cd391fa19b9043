"""`bpfwall watch`: the daemon that attaches the policy's filters (bpf programs, nft elements)
to unit cgroups as they appear."""
from __future__ import annotations

import os

from .options import cache_dir, pin_root, policy_dir_option, table


def register(add) -> None:
    p = add("watch", "attach the policy's filters to matching cgroups, now and as they appear (the daemon)")
    policy_dir_option(p)
    p.add_argument("--cgroup-root", metavar="PATH",
                   help="watch only this cgroup subtree (absolute or relative to the cgroup2 mount; "
                        "default: the whole mount); policy cgroup paths are relative to it")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the watcher remembers what it loaded (default $BPFWALL_STATE_DIR or /run/bpfwall)")
    p.add_argument("--once", action="store_true", help="load, reconcile once and exit (e.g. ExecStartPre=)")
    p.add_argument("--drop-events", type=int, metavar="N", default=None,
                   help="forward at most N drop events per unit and second to the journal, count the rest "
                        "(default 50; 0: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="also log debug records (vanished cgroups)")
    p.set_defaults(handler=run)


def run(args) -> None:
    from ..kernel import cgroup
    from ..watch.daemon import Watcher
    from ..watch.log import Log
    from ..watch.notify import Notifier
    from ..watch.state import DEFAULT_STATE_DIR

    root = cgroup.resolve(args.cgroup_root) if args.cgroup_root else cgroup.cgroup2_mount()
    state_dir = args.state_dir or os.environ.get("BPFWALL_STATE_DIR") or DEFAULT_STATE_DIR
    # The backends are built from the global options: --pin-root, --cache-dir, and --table
    # (default $BPFWALL_NFT_TABLE or "bpfwall"): where nft entries go.
    watcher = Watcher(getattr(args, "policy_dir", None), pin_root(args), root, state_dir, Log(args.verbose),
                      Notifier(), cache_dir(args), table=table(args), drop_events=args.drop_events)
    try:
        watcher.start(once=args.once)
        if not args.once:
            watcher.run()
    finally:
        watcher.close()
