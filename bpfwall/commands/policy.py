"""`bpfwall policy check|show|match` and `bpfwall import-scnpm`: read-only, never touch the kernel."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .options import cgroup_root_option, common, pin_root, policy_dir_option

CGROUP_ROOT_HELP = "the cgroup subtree the policy applies to, as `watch --cgroup-root` takes it"

EXIT_ERROR = 2
EXIT_NO_MATCH = 1


def register(add) -> None:
    p = add("policy", "check, show and query the policy files (/etc/bpfwall/*.toml)")
    sub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True

    def nested(name, help):
        # the global options after the subcommand too (match reads --pin-root), as every command takes them
        q = sub.add_parser(name, help=help, description=help, parents=[common()])
        policy_dir_option(q)
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return q

    q = nested("check", "report every error in the policy files (exit 2 if any), else summarize them; "
                        "warn about entries whose meaning changed and defaults that cut off running units")
    q.add_argument("files", nargs="*", metavar="FILE", help="check these files instead of the directory")
    cgroup_root_option(q, "the cgroup tree the warnings look at, " + CGROUP_ROOT_HELP)
    q.set_defaults(handler=cmd_check)

    q = nested("show", "show the effective entries: expressions normalized, defaults applied")
    q.add_argument("--effective", action="store_true",
                   help="list every existing cgroup with the entry that judges it (own, or a slice's default)")
    cgroup_root_option(q, CGROUP_ROOT_HELP)
    q.set_defaults(handler=cmd_show)

    q = nested("match", "which entry judges a cgroup and why, with every ancestor and the programs on each")
    q.add_argument("cgroup", metavar="CGROUP_PATH",
                   help="relative to the cgroup2 root (system.slice/nginx.service), or absolute")
    cgroup_root_option(q, CGROUP_ROOT_HELP)
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


def _roots(args, required: bool) -> tuple[str | None, str | None]:
    """(the cgroup2 mount, the policy's root: --cgroup-root or the mount); (None, None) when there
    is no cgroup2 here and nothing needs it. A --cgroup-root that does not exist is an error."""
    from ..kernel.cgroup import cgroup2_mount
    from ..kernel.errors import KernelError
    from ..policy.tree import root_of

    try:
        mount = cgroup2_mount()
    except KernelError:
        if required or args.cgroup_root:
            raise
        return None, None
    return mount, root_of(args.cgroup_root)


def cmd_check(args) -> None:
    from ..policy import check_policy, policy_dir
    from ..policy.changes import warnings
    from ..policy.tree import read_tree

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
    _, root = _roots(args, required=False)
    warned = warnings(policy, None if root is None else read_tree(root))
    source = ", ".join(files) if files else policy_dir(directory)
    if _json(args):
        _print_json({"ok": True, "source": source, "warnings": warned, "units": [
            {"name": e.name, "directions": _directions(e).split("+"), "backend": e.backend, "mode": e.mode,
             "cgroup": e.cgroup, "slice_default": e.is_slice_default, "strict": e.strict, "file": e.file,
             "line": e.line} for e in policy.entries]})
        return
    count = len(policy.entries)
    lines = [f"{source}: ok, {count} unit{'s' if count != 1 else ''}"]
    width = max((len(e.name) for e in policy.entries), default=0)
    for e in policy.entries:
        extra = f"  cgroup {e.cgroup}" if e.cgroup else ""
        extra += ("  slice default" + (", strict" if e.strict else "")) if e.is_slice_default else ""
        lines.append(f"  {e.name:<{width}}  {_directions(e):<14} {e.backend:<3} {e.mode:<7}{extra}  ({e.where})")
    print("\n".join(lines))
    for line in warned:
        print(line, file=sys.stderr)


def cmd_show(args) -> None:
    from ..policy import load_policy, policy_dir

    policy = load_policy(getattr(args, "policy_dir", None))
    if args.effective:
        from ..policy.tree import read_tree
        from .policy_view import effective, render_effective

        _, root = _roots(args, required=True)
        rows = effective(policy, read_tree(root))
        if _json(args):
            _print_json(rows)
        else:
            print(render_effective(rows, root))
        return
    if _json(args):
        _print_json([e.as_dict() for e in policy.entries])
        return
    blocks = []
    for e in policy.entries:
        spec = e.filter_spec()
        lines = [f"{e.name}  ({e.where})",
                 f"  backend {e.backend}, mode {e.mode}, set_capacity {e.set_capacity}"
                 + (f", compiler {e.compiler}" if e.compiler else "")]
        if e.is_slice_default:
            lines.append("  slice default" + (", strict: a cgroup below whose own filter is not on yet is dropped"
                                              if e.strict else ""))
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


def _relative(path: str, root: str | None) -> str:
    """An absolute path under the policy's root → relative to it; anything else as given."""
    if os.path.isabs(path) and root:
        root = root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            path = path[len(root):]
    return path.strip("/")


def cmd_match(args) -> None:
    from ..policy import load_policy
    from .policy_view import path_view, render_path_view

    policy = load_policy(getattr(args, "policy_dir", None))
    mount, root = _roots(args, required=False)
    view = path_view(policy, _relative(args.cgroup, root), mount, root, pin_root(args))
    if _json(args):
        _print_json(view)
    else:
        print(render_path_view(view))
    if all(view["judgement"][d]["judge"] is None for d in ("ingress", "egress")):
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
