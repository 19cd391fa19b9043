"""bpfwall(1) and bpfwall.toml(5), written from what --help and the policy checker use.

bpfwall(1) walks the argparse parser (cli.build_parser: every command, its usage, options and
help text, with the global options once) and appends the filter language reference of `bpfwall
help language`; bpfwall.toml(5) lists the keys schema.py accepts with the words of
policy/keys.py. Neither page holds text of its own about a command or key, so they cannot
disagree with --help. The package build runs `python3 -m bpfwall.manpage OUTDIR`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

MAN_WIDTH = 10_000  # argparse wraps usage lines; man fills its own, so never wrap here


def escape(text: str) -> str:
    """Text as roff reads it literally: backslashes and minus signs escaped, no line taken for
    a request (a leading '.' or ')."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def paragraph(text: str) -> str:
    """Prose as one filled paragraph (argparse help is a single logical line)."""
    return escape(" ".join(text.split()))


def preformatted(text: str) -> str:
    """A block kept as written (the language reference, the example policy)."""
    return ".PP\n.nf\n.RS 4\n" + escape(text.rstrip("\n")) + "\n.RE\n.fi"


def th(title: str, section: int) -> str:
    """The title line; its date is $SOURCE_DATE_EPOCH's (reproducible builds), else none."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc).strftime("%Y-%m-%d") if epoch else ""
    manual = "User Commands" if section == 1 else "File Formats"
    return f'.TH "{title.upper()}" "{section}" "{date}" "bpfwall" "{manual}"'


# -- bpfwall(1) -------------------------------------------------------------------------------

def commands(parser: argparse.ArgumentParser, words=()):
    """(["policy", "check"], its parser, its one-line help) for every command, nested ones too,
    in the order --help lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                if not nested:
                    yield [*words, name], sub, helps.get(name) or ""
                yield from commands(sub, [*words, name])


def global_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.option_strings}


def own_actions(sub: argparse.ArgumentParser, globals_: set[str]) -> list[argparse.Action]:
    """A command's arguments without -h and the global options every command repeats."""
    return [a for a in sub._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            and not (a.option_strings and a.dest in globals_)]


def usage(sub: argparse.ArgumentParser, actions) -> str:
    fmt = argparse.HelpFormatter(sub.prog, width=MAN_WIDTH)
    groups = [g for g in sub._mutually_exclusive_groups if all(a in actions for a in g._group_actions)]
    fmt.add_usage(None, actions, groups, prefix="")
    text = fmt.format_help().strip()
    return text[len(sub.prog):].strip() if text.startswith(sub.prog) else text  # the page names the command


def invocation(action: argparse.Action, sub: argparse.ArgumentParser) -> str:
    fmt = argparse.HelpFormatter(sub.prog, width=MAN_WIDTH)
    return fmt._format_action_invocation(action)


def option_items(actions, sub: argparse.ArgumentParser) -> list[str]:
    fmt = argparse.HelpFormatter(sub.prog, width=MAN_WIDTH)
    out = []
    for action in actions:
        if action.help is argparse.SUPPRESS:
            continue
        help_text = fmt._expand_help(action) if action.help else ""
        out += [".TP", f".B {escape(invocation(action, sub))}", paragraph(help_text)]
    return out


def environment(parser: argparse.ArgumentParser) -> list[str]:
    """$BPFWALL_* variables as the help texts name them, with the text that names them."""
    seen: dict[str, str] = {}
    for _, sub, _ in [([], parser, ""), *commands(parser)]:
        for action in sub._actions:
            for name in re.findall(r"\$(BPFWALL_[A-Z_]+)", action.help or ""):
                seen.setdefault(name, f"{'/'.join(action.option_strings)}: {action.help}")
    out = []
    for name in sorted(seen):
        out += [".TP", f".B {name}", paragraph(seen[name])]
    return out


def bpfwall_1(parser: argparse.ArgumentParser, reference: str, exit_error: int) -> str:
    globals_ = global_dests(parser)
    top = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    lines = [th("bpfwall", 1), ".SH NAME", "bpfwall \\- a per\\-unit eBPF firewall for systemd units",
             ".SH SYNOPSIS", f".B bpfwall\n{escape(usage(parser, top))} COMMAND [ARGS]",
             ".SH DESCRIPTION", paragraph(parser.description or ""),
             ".PP", paragraph("Every read command takes --json. Global options go before or after the "
                              "command; --help after any command shows the same text as this page."),
             ".SH GLOBAL OPTIONS", *option_items(top, parser), ".SH COMMANDS"]
    for words, sub, summary in commands(parser):
        actions = own_actions(sub, globals_)
        lines += [f'.SS "{escape(" ".join(words))}"', f".B bpfwall {escape(' '.join(words))}",
                  escape(usage(sub, actions)), ".PP", paragraph(summary)]
        lines += option_items(actions, sub)
        if sub.epilog and reference not in sub.epilog:  # check's epilog is the reference: given once below
            lines.append(preformatted(sub.epilog))
    lines += [".SH FILTER LANGUAGE", paragraph("As `bpfwall help language` prints it:"), preformatted(reference),
              ".SH ENVIRONMENT", *environment(parser),
              ".SH FILES",
              ".TP", ".I /etc/bpfwall/*.toml", paragraph("The policy, read in name order: see bpfwall.toml(5)."),
              ".TP", ".I /sys/fs/bpf/bpfwall", paragraph("The pin root: each loaded unit's programs and maps."),
              ".TP", ".I /run/bpfwall", paragraph("What the watcher and bpfwall run record they made."),
              ".TP", ".I bpfwall.service, bpfwall@.service",
              paragraph("The watcher (bpfwall watch) and the per-unit loader (bpfwall apply UNIT) of the "
                        "hand-off: the unit names its pinned filters in IPIngressFilterPath= and "
                        "IPEgressFilterPath=, which bpfwall dropin UNIT writes."),
              ".SH EXIT STATUS", ".TP", ".B 0", "Success.", ".TP", f".B {exit_error}",
              paragraph("An error, reported as one line `bpfwall: error: ...` on stderr; nothing was changed."),
              ".TP", ".B 130", "Interrupted (Ctrl\\-C).",
              ".SH SEE ALSO", ".BR bpfwall.toml (5),", ".BR systemd.resource\\-control (5),", ".BR bpftool (8),",
              ".BR nft (8)"]
    return "\n".join(lines) + "\n"


# -- bpfwall.toml(5) --------------------------------------------------------------------------

def key_items(docs: dict[str, str], choices: dict, defaults: dict) -> list[str]:
    out = []
    for key, text in docs.items():
        extra = ""
        if key in choices:
            extra += " One of: " + ", ".join(f'"{c}"' for c in choices[key]) + "."
        if key in defaults:
            value = defaults[key]
            shown = f'"{value}"' if isinstance(value, str) else str(value).lower()
            extra += f" Default: {shown}."
        out += [".TP", f".B {escape(key)}", paragraph(text + extra)]
    return out


def bpfwall_toml_5(example: str) -> str:
    from .policy import DEFAULT_POLICY_DIR, keys, schema
    from .policy.match import UNIT_SUFFIXES

    from .program_contract import LOG_BURST_DEFAULT, LOG_RATE_DEFAULT

    unit_keys = {k: keys.UNIT_ONLY[k] for k in schema.UNIT_KEYS if k in keys.UNIT_ONLY}
    shared = [k for k in schema.UNIT_KEYS if k not in keys.UNIT_ONLY]
    defaults = {**schema.BUILTIN_DEFAULTS, "log_rate": LOG_RATE_DEFAULT, "log_burst": LOG_BURST_DEFAULT}
    suffixes = ", ".join(UNIT_SUFFIXES)
    lines = [th("bpfwall.toml", 5), ".SH NAME", "bpfwall.toml \\- bpfwall's policy: which units get which filters",
             ".SH SYNOPSIS", f".I {DEFAULT_POLICY_DIR}/*.toml",
             ".SH DESCRIPTION",
             paragraph(f"Every *.toml file in {DEFAULT_POLICY_DIR} (--policy-dir DIR or $BPFWALL_POLICY_DIR "
                       "elsewhere) is read, in name order. A file is TOML with at most two tables: "
                       "[defaults], the settings of this file's units, and one [units.\"NAME\"] table per "
                       "unit. NAME is a unit name ending in " + suffixes + ", or a glob (*, ?) on unit names."),
             ".PP",
             paragraph("Check the files with `bpfwall policy check` (no root needed; every problem is "
                       "reported as FILE:LINE: message). bpfwall.service (`bpfwall watch`) applies the policy "
                       "to every matching cgroup; bpfwall@UNIT.service (`bpfwall apply UNIT`) pins one unit's "
                       "filters for the hand-off."),
             ".SH [defaults]", *key_items({k: keys.SETTINGS[k] for k in schema.DEFAULT_KEYS}, schema.CHOICES,
                                           defaults),
             '.SH [units."NAME"]',
             *key_items(unit_keys, schema.CHOICES, {}),
             ".PP", paragraph(f"And, for this unit alone, {', '.join(shared)}: as in [defaults]."),
             ".SH MATCHING",
             paragraph("Only a unit's own cgroup matches (its sub-cgroups inherit the programs). An entry "
                       "written with the exact unit name wins over globs; among globs the first in file "
                       "order wins. An entry whose name ends in .slice (system.slice, *.slice) is a slice "
                       "default: it matches slices only, and every other entry never matches a slice."),
             ".SH SLICE DEFAULTS",
             paragraph("The nearest entry judges a packet, alone: walking up from the socket's cgroup, the "
                       "first cgroup holding an entry that filters the packet's direction (the cgroup's own, "
                       "the unit it lies in, else the nearest slice with a default) decides; entries farther "
                       "up are not consulted. A unit's own entry thus passes what its slice's default would "
                       "drop (systemd's IPAddressDeny=any on a slice with IPAddressAllow= on a unit). An "
                       "entry that leaves a direction out leaves it to the nearest default. `bpfwall policy "
                       "match CGROUP` says which entry judges a cgroup and why; `bpfwall policy show "
                       "--effective` lists every cgroup with its judge."),
             ".SH PERMISSIONS",
             paragraph("A policy file is read only if nobody but root could have written it: a regular file "
                       "(not a symbolic link) owned by root (or by the user running bpfwall), not writable "
                       "by group or others, in a directory that meets the same rules, as does every "
                       "directory above it. Anything else is refused with one line naming the file and the fix."),
             ".SH EXAMPLE", preformatted(example),
             ".SH SEE ALSO", ".BR bpfwall (1)"]
    return "\n".join(lines) + "\n"


def write_pages(outdir: Path, example: Path) -> list[Path]:
    from .cli import EXIT_ERROR, build_parser
    from .lang.reference import reference

    outdir.mkdir(parents=True, exist_ok=True)
    pages = {"bpfwall.1": bpfwall_1(build_parser(), reference(), EXIT_ERROR),
             "bpfwall.toml.5": bpfwall_toml_5(example.read_text())}
    for name, text in pages.items():
        (outdir / name).write_text(text)
    return [outdir / name for name in pages]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bpfwall.manpage", description=__doc__.splitlines()[0])
    p.add_argument("outdir", type=Path, help="where bpfwall.1 and bpfwall.toml.5 are written")
    p.add_argument("--example", type=Path, default=Path(__file__).resolve().parent.parent / "examples" / "policy"
                   / "50-example.toml", help="the example policy shown in bpfwall.toml(5)")
    args = p.parse_args(argv)
    for page in write_pages(args.outdir, args.example):
        print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
