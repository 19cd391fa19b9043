"""`bpfwall policy check|show|match` and `bpfwall import-scnpm`: read-only, never touch the kernel."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .options import policy_dir_option

EXIT_ERROR = 2
EXIT_NO_MATCH = 1


def register(add) -> None:
    p = add("policy", "check, show and query the policy files (/etc/bpfwall/*.toml)")
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True

    def nested(name, help):
        q = sub.add_parser(name, help=help, description=help)
        policy_dir_option(q)
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return q

    q = nested("check", "report every error in the policy files (exit 2 if any), else summarize them")
    q.add_argument("files", nargs="*", metavar="FILE", help="check these files instead of the directory")
    q.set_defaults(handler=cmd_check)

    q = nested("show", "show the effective entries: expressions normalized, defaults applied")
    q.set_defaults(handler=cmd_show)

    q = nested("match", "which entry would police a cgroup, and why")
    q.add_argument("cgroup", metavar="CGROUP_PATH",
                   help="relative to the cgroup2 root (system.slice/nginx.service), or absolute")
    q.set_defaults(handler=cmd_match)

    p = add("import-scnpm", "translate scnpm '# unit :: add rule …' comment lines and the ruleset around them into "
            "a bpfwall policy deciding what nft decides", True)
    p.add_argument("file", metavar="FILE", help="an nftables.conf with scnpm comment rules ('-' = stdin)")
    p.add_argument("--partial", action="store_true",
                   help="exit 0 even if some lines cannot be translated (they are listed as comments)")
    p.add_argument("--default", choices=("accept", "drop"), dest="default_verdict",
                   help="the policy of the base chains that reach a unit's rules (default: as the file declares, "
                        "else accept)")
    p.add_argument("--hook", action="append", default=[], metavar="CHAIN=input|output",
                   help="make a chain the file does not hook a base chain on that hook")
    p.set_defaults(handler=cmd_import_scnpm)


def _json(args) -> bool:
    return getattr(args, "json", False)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _directions(entry) -> str:
    return "+".join(d for d in ("ingress", "egress") if getattr(entry, d) is not None)


def cmd_check(args) -> None:
    from ..policy import check_policy, policy_dir

    directory = getattr(args, "policy_dir", None)
    files = args.files or None
    policy, errors = check_policy(directory, files)
    if errors:
        if _json(args):
            _print_json({"ok": False, "errors": errors})
        else:
            for line in errors:
                print(line, file=sys.stderr)
        sys.exit(EXIT_ERROR)
    source = ", ".join(files) if files else policy_dir(directory)
    if _json(args):
        _print_json({"ok": True, "source": source, "units": [
            {"name": e.name, "directions": _directions(e).split("+"), "backend": e.backend, "mode": e.mode,
             "cgroup": e.cgroup, "file": e.file, "line": e.line} for e in policy.entries]})
        return
    count = len(policy.entries)
    lines = [f"{source}: ok, {count} unit{'s' if count != 1 else ''}"]
    width = max((len(e.name) for e in policy.entries), default=0)
    for e in policy.entries:
        extra = f"  cgroup {e.cgroup}" if e.cgroup else ""
        lines.append(f"  {e.name:<{width}}  {_directions(e):<14} {e.backend:<3} {e.mode:<7}{extra}  ({e.where})")
    print("\n".join(lines))


def cmd_show(args) -> None:
    from ..policy import load_policy, policy_dir

    policy = load_policy(getattr(args, "policy_dir", None))
    if _json(args):
        _print_json([e.as_dict() for e in policy.entries])
        return
    blocks = []
    for e in policy.entries:
        spec = e.filter_spec()
        lines = [f"{e.name}  ({e.where})",
                 f"  backend {e.backend}, mode {e.mode}, set_capacity {e.set_capacity}"]
        if e.cgroup:
            lines.append(f"  cgroup: {e.cgroup}")
        for d in ("ingress", "egress"):
            if spec[d] is not None:
                lines.append(f"  {d}: {spec[d]}")
        for name, value in spec["params"].items():
            lines.append(f"  ${name} = {value}")
        for name, elements in e.sets_as_written().items():
            lines.append(f"  @{name} = {{{', '.join(elements)}}}")
        blocks.append("\n".join(lines))
    print("\n\n".join(blocks) if blocks else f"{policy_dir(getattr(args, 'policy_dir', None))}: no units")


def _relative(path: str) -> str:
    """An absolute path under the cgroup2 mount → relative to it; anything else as given."""
    if os.path.isabs(path):
        try:
            from ..kernel.cgroup import cgroup2_mount

            mount = cgroup2_mount().rstrip("/")
        except Exception:  # no cgroup2 here: the path is taken as relative to the root
            mount = None
        if mount and (path == mount or path.startswith(mount + "/")):
            path = path[len(mount):]
    return path.strip("/")


def cmd_match(args) -> None:
    from ..policy import load_policy

    policy = load_policy(getattr(args, "policy_dir", None))
    report = policy.explain(_relative(args.cgroup))
    if _json(args):
        _print_json(report.as_dict())
    else:
        head = f"{report.entry.name} ({report.entry.where})" if report.entry else "no entry"
        lines = [f"{report.cgroup or '/'} → {head}", f"  why: {report.reason}"]
        for e, why in report.passed_over:
            lines.append(f"  passed over: {e.name} ({e.where}): {why}")
        print("\n".join(lines))
    if report.entry is None:
        sys.exit(EXIT_NO_MATCH)


def cmd_import_scnpm(args) -> None:
    from ..scnpm import import_file

    result = import_file(args.file, default=args.default_verdict, hooks=args.hook)
    if _json(args):
        _print_json(result.as_dict())
    else:
        sys.stdout.write(result.toml)
        for problem in result.problems:
            print(f"{problem.where}: cannot translate: {problem.why}", file=sys.stderr)
    if result.problems and not args.partial:
        sys.exit(EXIT_ERROR)
