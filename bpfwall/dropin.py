"""Drop-ins that hand a unit's pinned filters to systemd (IPIngressFilterPath=).

`bpfwall dropin nginx.service` writes /etc/systemd/system/nginx.service.d/bpfwall.conf:

    [Unit]
    Requires=bpfwall@nginx.service.service
    After=bpfwall@nginx.service.service

    [Service]
    IPIngressFilterPath=/sys/fs/bpf/bpfwall/nginx+service/ingress

The loader instance is `bpfwall@` + the unit name verbatim + `.service`; the
template passes `%i` (the instance as written, never unescaped) to
`bpfwall apply`. Do not build it with `systemd-escape --template`: that turns
`-` into `\\x2d`, and `%i` would then name a different unit.

The section holding IP*FilterPath= is the unit type's own ([Service],
[Socket], …); only the types with resource control have one.

Every value goes through systemd's own reading rules (systemd.syntax(5),
conf-parser.c): a line ends at \n, \r or NUL, a line ending in a backslash
is joined with the next, whitespace around a value is stripped, and '%'
starts a specifier. IP*FilterPath= then takes the rest verbatim (no quotes,
no escapes) and ignores a relative path or one with a '..' component, which
would leave the unit unfiltered; Environment= unquotes and C-unescapes.
Values those rules cannot carry are refused, never written.
"""
from __future__ import annotations

import os
import tempfile
import unicodedata

from . import unitkey
from .errors import Error

DEFAULT_UNIT_DIR = "/etc/systemd/system"
DROPIN_NAME = "bpfwall.conf"
DIRECTIONS = ("ingress", "egress")
SETTINGS = {"ingress": "IPIngressFilterPath", "egress": "IPEgressFilterPath"}
# Unit types with resource control (systemd.resource-control(5)) and their section.
SECTIONS = {"service": "Service", "socket": "Socket", "mount": "Mount", "swap": "Swap",
            "slice": "Slice", "scope": "Scope"}
# Slices that contain the loader itself (system.slice/system-bpfwall.slice/bpfwall@….service):
# ordering them after the loader would be a cycle.
LOADER_SLICES = ("-.slice", "system.slice", "system-bpfwall.slice")


class DropinError(Error):
    """A unit that cannot get a bpfwall drop-in; the message says why."""


def unit_type(unit: str) -> str:
    return unit.rsplit(".", 1)[-1] if "." in unit else ""


def section(unit: str) -> str:
    """The section of `unit` that takes IP*FilterPath=, after checking the unit can have one."""
    try:
        unitkey.validate(unit, allow_glob=False)
    except unitkey.UnitNameError as e:
        raise DropinError(str(e)) from None
    kind = unit_type(unit)
    if kind not in SECTIONS and kind not in ("target", "timer", "path", "device", "automount"):
        raise DropinError(f"{unit!r} is not a unit name: it needs a type suffix "
                          f"(.{', .'.join(SECTIONS)})")
    if kind not in SECTIONS:
        raise DropinError(f"{unit}: a .{kind} unit has no IPIngressFilterPath= (only .{', .'.join(SECTIONS)} "
                          "units do); police the units it starts")
    name = unit[:-len(kind) - 1]
    if name.endswith("@"):
        raise DropinError(f"{unit} is a template; give an instance (e.g. {name}1.{kind}): "
                          "each instance has its own pins")
    if unit == "bpfwall.service" or unit.startswith("bpfwall@"):
        raise DropinError(f"{unit} is bpfwall's own unit; it cannot police itself")
    if unit in LOADER_SLICES:
        raise DropinError(f"{unit} contains the loader units themselves (a dependency cycle); "
                          "let the watcher (bpfwall.service) police it")
    loader = loader_unit(unit)
    if len(loader) > unitkey.UNIT_NAME_MAX:
        raise DropinError(f"{unit}: the loader unit name {loader[:40]}… would be {len(loader)} characters; "
                          f"systemd allows at most {unitkey.UNIT_NAME_MAX}")
    return SECTIONS[kind]


def loader_unit(unit: str) -> str:
    """The instance of bpfwall@.service that pins `unit`'s filters."""
    return f"bpfwall@{unit}.service"


def dropin_path(unit_dir: str, unit: str) -> str:
    return os.path.join(unit_dir, f"{unit}.d", DROPIN_NAME)


def parse_directions(text: str) -> tuple[str, ...]:
    """`ingress,egress` → ('ingress', 'egress'), in canonical order."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in DIRECTIONS]
    if bad or not words:
        raise DropinError(f"--directions {text!r}: give ingress, egress or ingress,egress")
    return tuple(d for d in DIRECTIONS if d in words)


# Characters no unit file value may hold, by Unicode category: systemd breaks lines at
# \r and NUL as well as \n; the others (C1 controls such as NEL, U+2028/U+2029, bidi
# overrides) are line breaks or invisible to whoever reads the file.
UNWRITABLE = {"Cc": "a control character", "Cf": "an invisible formatting character",
              "Zl": "a line separator", "Zp": "a paragraph separator",
              "Cs": "a byte that is not UTF-8"}


def _refuse_unwritable(what: str, value: str) -> None:
    for ch in value:
        kind = UNWRITABLE.get(unicodedata.category(ch))
        if kind:
            code = f"0x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"U+{ord(ch):04X}"
            raise DropinError(f"{what} {value!r} contains {kind} ({code}); it cannot be written into a unit file")


def check_filter_path(path: str, transient: bool = False) -> None:
    """Refuse a pin path that systemd would not read back from a unit file as exactly `path`.

    `transient`: the path goes to systemd over D-Bus (systemd-run -p), and systemd writes
    it unescaped into the transient unit file it reads again on daemon-reload.
    """
    _refuse_unwritable("pin path", path)
    if transient and "%" in path:
        problem = "contains '%', which systemd writes unescaped into the transient unit (a specifier)"
    elif path != path.strip(" "):
        problem = "begins or ends with a space, which systemd strips"
    elif not path.startswith("/"):
        problem = "is not absolute (systemd ignores it: the unit would run unfiltered)"
    elif ".." in path.split("/"):
        problem = "has a '..' component (systemd ignores it: the unit would run unfiltered)"
    elif path.endswith("\\"):
        problem = "ends with a backslash, which joins the next line of a unit file"
    else:
        return
    raise DropinError(f"pin path {path!r} {problem}; choose another --pin-root")


def filter_path_value(path: str) -> str:
    """`path` written as an IP*FilterPath= value: taken verbatim after '%' specifiers."""
    check_filter_path(path)
    return path.replace("%", "%%")


def environment_setting(key: str, value: str) -> str:
    """An Environment= line that systemd reads back as exactly key=value."""
    _refuse_unwritable(key, value)
    quoted = f"{key}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{quoted}"'


def render(unit: str, paths: dict[str, str]) -> str:
    """The drop-in text: order and require the loader, hand systemd each direction's pin."""
    sect = section(unit)
    if not paths:
        raise DropinError(f"{unit}: no direction to filter")
    values = {d: filter_path_value(path) for d, path in paths.items()}
    loader = loader_unit(unit)
    lines = [
        f"# Written by `bpfwall dropin {unit}`; undo with `bpfwall dropin --remove {unit}`.",
        f"# {loader} pins the policy's filters first; systemd attaches them",
        "# when it creates the cgroup, and refuses to start the unit if a pin is missing.",
        "[Unit]",
        f"Requires={loader}",
        f"After={loader}",
        "",
        f"[{sect}]",
    ]
    lines += [f"{SETTINGS[d]}={values[d]}" for d in DIRECTIONS if d in values]
    return "\n".join(lines) + "\n"


def render_loader_env(env: dict[str, str]) -> str:
    """A drop-in for the loader instance: where it finds the policy and pins (non-default only)."""
    lines = ["# Written by `bpfwall dropin`: the loader uses the same pin root and policy.", "[Service]"]
    lines += [environment_setting(k, v) for k, v in sorted(env.items())]
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> bool:
    """Write atomically (a reader sees the old file or the new one); False if it was already so."""
    try:
        return _write(path, text)
    except OSError as e:
        raise DropinError(f"cannot write {path}: {e.strerror or e}") from None


def _write(path: str, text: str) -> bool:
    try:
        with open(path) as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bpfwall-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return True


def remove(path: str) -> bool:
    """Delete the drop-in, and its .d directory if that leaves it empty; False if absent."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass  # other drop-ins live there: keep it
    return True


# Where systemd finds system units (systemd.unit(5), "System Unit Search Path"; /lib on Debian).
UNIT_SEARCH_PATH = ("/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
                    "/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                    "/usr/lib/systemd/system", "/lib/systemd/system")
TEMPLATE = "bpfwall@.service"


def template_installed(unit_dir: str) -> bool:
    """Can systemd start bpfwall@UNIT.service? Asked of systemd when it runs (it knows every
    search path, generators included), else looked up in `unit_dir` and the standard paths."""
    import subprocess

    if systemd_running():
        proc = subprocess.run(["systemctl", "show", "--property=LoadState", "--value", loader_unit("x.service")],
                              capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip() == "loaded"
    return any(os.path.isfile(os.path.join(d, TEMPLATE)) for d in (unit_dir, *UNIT_SEARCH_PATH))


def systemd_running() -> bool:
    """systemd is PID 1 (sd_booted(3): /run/systemd/system exists)."""
    return os.path.isdir("/run/systemd/system")
