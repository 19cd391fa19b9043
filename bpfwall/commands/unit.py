"""Commands that put a unit's filters where systemd finds them: apply, dropin, run.

`apply` is the loader unit's ExecStart (bpfwall@UNIT.service), `dropin` writes
the unit's drop-in that requires the loader and names the pins, `run` starts a
command with the filters already on its cgroup.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import replace

from .. import dropin
from ..errors import Error
from .common import emit, filter_program, param_values, set_values
from .options import (backend, compiler, filter_options, log_limit, log_options, policy_dir, policy_dir_option,
                      unit_argument)


class ApplyError(Error):
    """No usable policy entry for the unit."""


def register(add) -> None:
    p = add("apply", "load and pin UNIT's filters from the policy (the ExecStart of bpfwall@UNIT.service)", True)
    unit_argument(p, "the unit whose policy entry to load (its name as it is, not systemd-escape'd)", "policy")
    policy_dir_option(p)
    log_options(p)
    p.set_defaults(handler=cmd_apply)

    p = add("dropin", "write UNIT's drop-in: require bpfwall@UNIT.service and hand systemd the pinned filters")
    unit_argument(p, "the unit to police", "policy")
    policy_dir_option(p)
    p.add_argument("--directions", metavar="ingress,egress",
                   help="filter these directions (default: the ones UNIT's policy entry has)")
    p.add_argument("--unit-dir", default=dropin.DEFAULT_UNIT_DIR, metavar="DIR",
                   help=f"where the drop-in goes (default {dropin.DEFAULT_UNIT_DIR})")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true", help="print the drop-in, write nothing")
    what.add_argument("--remove", action="store_true", help="delete the drop-in")
    p.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    p.add_argument("--force", action="store_true",
                   help=f"write it even though {dropin.TEMPLATE} is not installed (the unit cannot start until it is)")
    p.set_defaults(handler=cmd_dropin)

    p = add("run", "run a command with filters on its cgroup from its first socket on: run [OPTIONS] -- CMD ARG…")
    filter_options(p, "run")
    p.add_argument("--name", metavar="NAME", help="the scope (and pin) name; default run-bpfwall-<random>.scope")
    p.add_argument("command", nargs="+", metavar="CMD", help="the command and its arguments (after --)")
    p.set_defaults(handler=cmd_run)


def policy_entry(unit: str, directory: str):
    """UNIT's entry: the one written with exactly its name, else the first matching glob."""
    from ..policy import load_policy
    from ..unitkey import UnitNameError, validate

    try:
        validate(unit, allow_glob=False)
    except UnitNameError as e:
        raise ApplyError(str(e)) from None
    policy = load_policy(directory=directory)
    entry = policy.entry(unit)
    passed_over = []
    if entry is None or entry.is_glob:
        # The bare unit name as the cgroup path: an entry restricted by a cgroup glob
        # needs the real path, which only the watcher sees.
        report = policy.explain(unit)
        entry, passed_over = report.entry, report.passed_over
    if entry is None:
        hint = (f" (only {', '.join(f'{e.name} ({e.where})' for e, _ in passed_over)}, restricted by "
                "cgroup =, which the watcher applies)") if passed_over else _escaping_hint(unit, policy)
        raise ApplyError(f"no policy entry for {unit} in {directory}{hint}")
    if entry.backend != "bpf":
        raise ApplyError(f"the policy entry for {unit} ({entry.where}) uses the {entry.backend} backend; "
                         "IPIngressFilterPath=/IPEgressFilterPath= need pinned BPF programs, so the "
                         "watcher (bpfwall.service) applies it instead")
    return entry


def _escaping_hint(unit: str, policy) -> str:
    """systemd-escape turns '-' into '\\x2d'; %i keeps that, so say what went wrong."""
    if "\\x2d" not in unit:
        return ""
    plain = unit.replace("\\x2d", "-")
    if policy.entry(plain) is None and policy.match(plain) is None:
        return ""
    return (f" (there is one for {plain}: the loader instance is the unit name as it is, "
            f"bpfwall@{plain}.service, not systemd-escape'd)")


def cmd_apply(args) -> None:
    entry = policy_entry(args.unit, policy_dir(args))
    log = {**entry.log, **(log_limit(args) or {})}  # the command line over the policy
    target = backend(args, entry.backend)
    if not entry.is_slice_default and target.built_as_guard(args.unit):
        # the watcher made this unit's filter a guard (it holds nearer entries: watch/nesting.py);
        # loading it plain would AND their verdicts again until the watcher noticed
        entry = replace(entry, guards_nested=True)
    result = target.load(args.unit, entry.program(compiler(args)), entry.params, entry.sets, entry.mode,
                         log=log or None)
    lines = [f"applied {entry.name} ({entry.where}) to {args.unit} [{entry.mode}]"]
    lines += [f"  {d}: {place}" for d, place in result.places.items()]
    if result.replaced:
        lines.append(f"  replaced in place on {len(result.replaced)} attachment(s)")
    emit(args, {"unit": args.unit, "entry": entry.name, "file": entry.file, "line": entry.line,
                "mode": entry.mode, "path": result.details["path"], "pins": result.places,
                "replaced": [{"cgroup": c, "direction": d} for c, d in result.replaced]},
         "\n".join(lines))


def cmd_dropin(args) -> None:
    from ..backends import bpf
    from ..policy import DEFAULT_POLICY_DIR

    unit = args.unit
    dropin.section(unit)  # refuse units that cannot have one before anything else
    path = dropin.dropin_path(args.unit_dir, unit)
    loader_path = dropin.dropin_path(args.unit_dir, dropin.loader_unit(unit))
    if args.remove:
        removed = [p for p in (path, loader_path) if dropin.remove(p)]
        print(f"removed {', '.join(removed)}" if removed else f"no bpfwall drop-in for {unit} ({path})")
        if removed:
            _reload(args)
        return
    if args.directions:
        directions = dropin.parse_directions(args.directions)
    else:
        entry = policy_entry(unit, policy_dir(args))
        directions = tuple(d for d in bpf.DIRECTIONS if getattr(entry, d) is not None)
    pins = backend(args, "bpf")  # the drop-in hands systemd pinned programs
    files = {path: dropin.render(unit, {d: pins.prog_path(unit, d) for d in directions})}
    env = {}
    if pins.pin_root != bpf.DEFAULT_PIN_ROOT:
        env["BPFWALL_PIN_ROOT"] = pins.pin_root
    if policy_dir(args) != DEFAULT_POLICY_DIR:
        env["BPFWALL_POLICY_DIR"] = os.path.abspath(policy_dir(args))
    if env:  # the loader must pin where the drop-in looks, from the same policy
        files[loader_path] = dropin.render_loader_env(env)
    if args.dry_run:
        print("\n".join(f"# {p}\n{text}" for p, text in files.items()), end="")
        return
    if not args.force and not dropin.template_installed(args.unit_dir):
        raise dropin.DropinError(
            f"{dropin.TEMPLATE} is not installed, and {unit} would not start with "
            f"Requires={dropin.loader_unit(unit)}: install bpfwall's units (the bpfwall package, or "
            f"`make install`), or pass --force")
    changed = [p for p, text in files.items() if dropin.write(p, text)]
    if not env:
        dropin.remove(loader_path)  # an earlier non-default pin root no longer applies
    print(f"wrote {', '.join(changed)}" if changed else f"{path} is up to date")
    if changed:
        _reload(args)


def _reload(args) -> None:
    if not dropin.systemd_running() or args.no_reload:
        print("run `systemctl daemon-reload` for systemd to see it")
        return
    proc = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise Error(f"systemctl daemon-reload failed: {(proc.stderr.strip() or '?').splitlines()[0]}")
    print("systemd reloaded (systemctl daemon-reload)")


def cmd_run(args) -> None:
    from .. import run

    program = filter_program(args, "run")
    params, sets = param_values(args), set_values(args, program)
    # Pinned programs: systemd-run hands them to the scope (IP*FilterPath=).
    status = run.run(args.command, program, params, sets, args.mode, name=args.name, backend=backend(args, "bpf"),
                     log=log_limit(args))
    raise SystemExit(status)
