"""Options that several commands share, each declared once, and what they resolve to.

The global options (`common`) are accepted before or after the command name; the
resolution functions (`pin_root`, `cache_dir`, `table`, `backend`…) apply the
environment and the defaults, so every command reads them the same way.
"""
from __future__ import annotations

import argparse
import os

from ..backends import NAMES as BACKENDS
from ..errors import UsageError


def common(json_output: bool = False) -> argparse.ArgumentParser:
    """The global options: a parent parser for the top level and for every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--pin-root", metavar="DIR", default=argparse.SUPPRESS,
                   help="bpffs directory for pins (default $BPFWALL_PIN_ROOT or /sys/fs/bpf/bpfwall)")
    p.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS,
                   help="compiled-object cache (default $BPFWALL_CACHE_DIR or ~/.cache/bpfwall)")
    p.add_argument("--backend", choices=BACKENDS, default=argparse.SUPPRESS,
                   help="bpf (cgroup_skb programs, the default) or nft (socket cgroupv2 verdict maps); "
                        "default $BPFWALL_BACKEND or bpf")
    p.add_argument("--table", metavar="NAME", default=argparse.SUPPRESS,
                   help="nft table of the nft backend (default $BPFWALL_NFT_TABLE or bpfwall)")
    p.add_argument("--log-group", metavar="N", type=int, default=argparse.SUPPRESS,
                   help="nflog group of the nft table's drop events (default: the table's, 2120 for a new one)")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


# -- what the global options resolve to -------------------------------------------------------

def pin_root(args) -> str:
    from ..backends.bpf import DEFAULT_PIN_ROOT

    return getattr(args, "pin_root", None) or os.environ.get("BPFWALL_PIN_ROOT") or DEFAULT_PIN_ROOT


def cache_dir(args):
    """The --cache-dir given, as a Path; None: the build's default ($BPFWALL_CACHE_DIR, ~/.cache)."""
    from pathlib import Path

    value = getattr(args, "cache_dir", None)
    return Path(value) if value else None


def table(args) -> str | None:
    """The --table given; None: the nft backend's default ($BPFWALL_NFT_TABLE or "bpfwall").
    Not resolved here: that would import the nft backend (~50 ms) for every bpf command."""
    return getattr(args, "table", None)


def backend_name(args) -> str:
    name = getattr(args, "backend", None) or os.environ.get("BPFWALL_BACKEND") or "bpf"
    if name not in BACKENDS:
        raise UsageError(f"backend {name!r} (from BPFWALL_BACKEND): choose bpf or nft")
    return name


def backend(args, name: str | None = None):
    """The backend the global options choose (or backend `name`), built from them."""
    from ..backends import create

    return create(name or backend_name(args), pin_root=pin_root(args), table=table(args), cache=cache_dir(args),
                  log_group=getattr(args, "log_group", None))


def chosen_backends(args) -> dict:
    """--backend (or $BPFWALL_BACKEND) alone when given, else both, by name."""
    if getattr(args, "backend", None) or os.environ.get("BPFWALL_BACKEND"):
        names = [backend_name(args)]
    else:
        names = list(BACKENDS)
    return {name: backend(args, name) for name in names}


def policy_dir(args) -> str:
    from ..policy import policy_dir as resolve

    return resolve(getattr(args, "policy_dir", None))


# -- option groups of several commands ------------------------------------------------------

def policy_dir_option(p) -> None:
    p.add_argument("--policy-dir", metavar="DIR", default=argparse.SUPPRESS,
                   help="where the policy's *.toml files are (default $BPFWALL_POLICY_DIR or /etc/bpfwall)")


def cgroup_root_option(p, help: str) -> None:
    p.add_argument("--cgroup-root", metavar="PATH", default=None,
                   help=f"{help} (absolute or relative to the cgroup2 mount; default: the whole mount); "
                        "policy cgroup paths are relative to it")


def filter_options(p, command: str) -> None:
    """--ingress, --egress, --mode: a unit's filters as `load` and `run` take them."""
    left_out = ("a direction left out is not filtered (a loaded unit's filter for it is detached and "
                "unpinned)") if command == "load" else "a direction left out is not filtered"
    p.add_argument("--ingress", metavar="EXPR",
                   help=f"filter for packets the unit receives (see `bpfwall help language`); {left_out}")
    p.add_argument("--egress", metavar="EXPR", help="filter for packets the unit sends")
    value_options(p, reload=command == "load")
    p.add_argument("--mode", choices=("enforce", "audit"),
                   help="enforce drops what the filter refuses; audit passes everything and counts what it "
                        "would drop (default: enforce; a reload keeps the unit's mode)")
    capacity_options(p)
    log_options(p)



def value_options(p, reload: bool = False) -> None:
    """--param and --set: the values of an expression's $params and @sets."""
    kept = ", or what the loaded unit has" if reload else ""
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help=f"value of $NAME, a number (repeatable; default 0{kept})")
    p.add_argument("--set", action="append", default=[], metavar="NAME=E1,E2",
                   help=f"elements of @NAME: numbers, ranges lo..hi, addresses, networks (repeatable; "
                        f"default empty{kept})")


def capacity_options(p) -> None:
    from ..capacity import UNFORCED_LIMIT, show_bytes

    p.add_argument("--set-capacity", type=int, metavar="N", help="elements each @set can hold (default 4096)")
    p.add_argument("--force-capacity", action="store_true",
                   help=f"allow a --set-capacity whose sets take more than {show_bytes(UNFORCED_LIMIT)} "
                        "of kernel memory")


def unit_argument(p, what: str = "the unit", complete: str = "loaded", **kwargs) -> None:
    """The UNIT argument; Tab offers the loaded units, or with complete="policy" the policy's."""
    from . import completion

    action = p.add_argument("unit", help=f"{what}: a systemd unit name, e.g. nginx.service", **kwargs)
    action.completer = completion.policy_units if complete == "policy" else completion.loaded_units


# -- drop events' limit: `set log_rate=N`, load/apply/run --log-rate/--log-burst ----------------

def log_value(name: str, text: str) -> int:
    """A log_rate/log_burst value: a whole number in range (log_rate 0 turns events off)."""
    from ..program_contract import LOG_LIMIT_MAX

    try:
        value = int(text)
    except ValueError:
        value = -1
    lo = 0 if "rate" in name else 1  # a burst of 0 would let no event through: log_rate=0 says that
    if not lo <= value <= LOG_LIMIT_MAX:
        raise UsageError(f"{name}={text}: a whole number {lo}..{LOG_LIMIT_MAX} (log_rate=0 turns drop events off)")
    return value


def log_options(p) -> None:
    from ..program_contract import LOG_BURST_DEFAULT, LOG_RATE_DEFAULT

    p.add_argument("--log-rate", metavar="N", type=lambda t: log_value("--log-rate", t), default=None,
                   help=f"drop events per second and direction, at most (0: none; default {LOG_RATE_DEFAULT}, "
                        "or what a loaded unit has; `bpfwall set UNIT log_rate=N` changes it live)")
    p.add_argument("--log-burst", metavar="N", type=lambda t: log_value("--log-burst", t), default=None,
                   help=f"drop events allowed at once above the rate (default {LOG_BURST_DEFAULT})")


def log_limit(args) -> dict[str, int] | None:
    """{log_rate, log_burst} as given on the command line (either may be left out), or None."""
    out = {k: v for k in ("log_rate", "log_burst") if (v := getattr(args, k, None)) is not None}
    return out or None
