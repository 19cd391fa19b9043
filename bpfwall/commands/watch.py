"""`bpfwall watch`: the daemon that attaches the policy's filters (bpf programs, nft elements)
to unit cgroups as they appear."""
from __future__ import annotations

import os

from .options import cache_dir, cgroup_root_option, pin_root, policy_dir_option, table


def register(add) -> None:
    p = add("watch", "attach the policy's filters to matching cgroups, now and as they appear (the daemon)")
    policy_dir_option(p)
    cgroup_root_option(p, "watch only this cgroup subtree")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the watcher remembers what it loaded (default $BPFWALL_STATE_DIR or /run/bpfwall)")
    p.add_argument("--once", action="store_true", help="load, reconcile once and exit (e.g. ExecStartPre=)")
    p.add_argument("--metrics-listen", metavar="ADDR:PORT",
                   help="serve every unit's counters and the reaction-time histogram as Prometheus metrics "
                        "over HTTP (PORT alone: on 127.0.0.1; IPv6 as [ADDR]:PORT); off by default")
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

    listen = None
    if args.metrics_listen is not None:
        from ..metrics import parse_listen

        listen = parse_listen(args.metrics_listen)  # a bad address: refused before anything starts
    root = cgroup.resolve(args.cgroup_root) if args.cgroup_root else cgroup.cgroup2_mount()
    state_dir = args.state_dir or os.environ.get("BPFWALL_STATE_DIR") or DEFAULT_STATE_DIR
    # The backends are built from the global options: --pin-root, --cache-dir, and --table
    # (default $BPFWALL_NFT_TABLE or "bpfwall"): where nft entries go.
    watcher = Watcher(getattr(args, "policy_dir", None), pin_root(args), root, state_dir, Log(args.verbose),
                      Notifier(), cache_dir(args), table=table(args), drop_events=args.drop_events)
    try:
        if listen is not None:
            serve_metrics(watcher, listen, pin_root(args), table(args))
        watcher.start(once=args.once)
        if not args.once:
            watcher.run()
    finally:
        watcher.close()


def serve_metrics(watcher, listen: tuple[str, int], pin_root: str, table: str) -> None:
    """The metrics endpoint, served from a thread with backends of its own (the watcher's loop and
    a scrape share nothing but the kernel's objects); the loop observes its reaction times."""
    from .. import backends, metrics

    noted: set[str] = set()

    def note(text: str) -> None:  # once each, not at every scrape
        if text not in noted:
            noted.add(text)
            watcher.log.warning("metrics", text)

    reg = metrics.registry(backends.every(pin_root=pin_root, table=table), note)
    watcher.reaction = metrics.reaction_histogram(reg).observe
    metrics.serve(reg, *listen)
    watcher.log.info("metrics", f"serving metrics on http://{_host(listen[0])}:{listen[1]}/metrics")


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
