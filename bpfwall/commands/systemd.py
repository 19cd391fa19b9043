"""`bpfwall import-systemd UNIT`: a unit's IPAddressAllow=, IPAddressDeny= and
RestrictNetworkInterfaces=, read from systemd, as a policy entry (policy/systemd.py)."""
from __future__ import annotations

import subprocess
import sys

from .. import unitkey
from ..errors import Error
from ..policy.schema import check_document
from ..policy.systemd import PROPERTIES, entry_toml, parse_show


class SystemdImportError(Error):
    """The unit's settings cannot be read or expressed."""


def register(add) -> None:
    p = add("import-systemd", "print the policy entry for a unit's IPAddressAllow=, IPAddressDeny= and "
            "RestrictNetworkInterfaces= (read with systemctl show)")
    p.add_argument("unit", metavar="UNIT", help="a unit name, e.g. nginx.service")
    p.set_defaults(handler=cmd_import_systemd)


def show(unit: str) -> dict[str, str]:
    """The properties systemd has for `unit` (an argument list, never a shell)."""
    argv = ["systemctl", "show", *(f"--property={p}" for p in PROPERTIES), "--", unit]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise SystemdImportError("systemctl not found: import-systemd reads the unit from systemd") from None
    except subprocess.TimeoutExpired:
        raise SystemdImportError(f"systemctl show {unit} did not answer within 30 s") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SystemdImportError(f"systemctl show {unit}: {why}")
    return parse_show(proc.stdout)


def cmd_import_systemd(args) -> None:
    unit = args.unit
    try:
        unitkey.validate(unit)
    except unitkey.UnitNameError as e:
        raise SystemdImportError(str(e)) from None
    props = show(unit)
    if props.get("LoadState") == "not-found":
        raise SystemdImportError(f"systemd has no unit {unit}")
    try:
        text = entry_toml(unit, props)
    except ValueError as e:
        raise SystemdImportError(str(e)) from None
    checked = check_document(f"({unit})", text)  # what we print must be a policy bpfwall accepts
    if checked.errors:
        raise SystemdImportError(checked.errors[0].split(": ", 1)[-1])
    sys.stdout.write(text)
