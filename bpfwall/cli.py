"""The `bpfwall` command: the parser and `main`. The commands live in bpfwall/commands/.

Every error is reported the same way: `bpfwall: error: <one line>` on stderr
(for an expression, followed by the expression with a caret under the
column), exit status 2, and nothing changed in the kernel — all input is
checked before the first bpf(2) call that changes state.
"""
from __future__ import annotations

import argparse
import sys

from .errors import Error, UsageError, os_error_line

EXIT_ERROR = 2

__all__ = ["EXIT_ERROR", "UsageError", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other error
        # main prints "bpfwall: error: "; a sub-command's parser adds its own name after it
        # ("bpfwall stats: …"), the top-level one (unrecognized arguments) nothing more.
        where = "" if self.prog == "bpfwall" else f"{self.prog}: "
        raise UsageError(f"{where}{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from .commands import register_all
    from .commands.options import common

    parents, parents_json = [common()], [common(json_output=True)]
    parser = _Parser(prog="bpfwall", parents=parents,
                     description="A per-unit eBPF firewall for systemd units. "
                                 "`bpfwall help language` describes the filter language.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(name, help, json_output=False, **kwargs):
        return sub.add_parser(name, help=help, description=help,
                              parents=parents_json if json_output else parents, **kwargs)

    register_all(add)
    parser.commands = sub.choices  # name → its parser (`bpfwall help COMMAND`)
    return parser


def _report(lines: list[str]) -> int:
    print(f"bpfwall: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return EXIT_ERROR


def main(argv=None) -> int:
    try:
        parser = build_parser()
        if argv is None:  # the shell's Tab (argcomplete): answers and exits
            from .commands.completion import autocomplete
            autocomplete(parser)
        args = parser.parse_args(argv)
        args.handler(args)
        return 0
    except Error as e:  # every layer's errors derive from it (bpfwall/errors.py)
        return _report(e.lines())
    except BrokenPipeError:
        return 0
    except OSError as e:  # a file or system call the layers did not expect to fail: still one line
        return _report([os_error_line(e)])
    except MemoryError:
        # Inputs are counted before anything is enumerated; this is the last line of defence.
        print("bpfwall: error: out of memory: the request needs more memory than bpfwall may use here",
              file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
