"""What a policy file may contain, and every way it can be wrong.

`check_document(file, text)` returns the file's entries and its errors, each
error one line `FILE:LINE: key.path: message`. Checking goes on after an
error, so one run reports everything that is wrong in a file.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
import fnmatch
import re
import tomllib

from .. import unitkey
from ..build import DEFAULT_SET_CAPACITY
from ..compilers import CHOICES as COMPILERS
from ..capacity import CAPACITY_MAX as SET_CAPACITY_MAX, CapacityError, check as check_capacity
from ..lang.checker import analyze_pair
from ..lang.errors import LangError
from ..lang.names import did_you_mean, suggestions
from ..lang.setcontents import count as set_count
from ..lang.values import PARAM_MAX, parse_set_elements
from .entry import Entry
from .locate import defined_twice, line_of, scan, syntax_error_line
from .match import SLICE_SUFFIX, UNIT_SUFFIXES, is_slice_name
from .systemd import address_filter, combine, prefixes

TOP_KEYS = ("defaults", "units")
DEFAULT_KEYS = ("backend", "mode", "set_capacity", "force_capacity", "log_rate", "log_burst", "compiler")
UNIT_KEYS = ("ingress", "egress", "params", "sets", "mode", "backend", "set_capacity", "force_capacity", "cgroup",
             "log_rate", "log_burst", "strict", "ip_address_allow", "ip_address_deny", "compiler")
ADDRESS_KEYS = ("ip_address_allow", "ip_address_deny")  # systemd's IPAddressAllow=/IPAddressDeny= (systemd.py)
LOG_KEYS = ("log_rate", "log_burst")  # the drop events' limit: only those written are set (see Entry.log)
CHOICES = {"backend": ("bpf", "nft"), "mode": ("enforce", "audit"), "compiler": COMPILERS}
BUILTIN_DEFAULTS = {"backend": "bpf", "mode": "enforce", "set_capacity": DEFAULT_SET_CAPACITY,
                    "force_capacity": False}

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def show_path(path: tuple) -> str:
    """A key path as TOML writes it: units."nginx.service".sets.admins[2]."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else '"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out += ("." if out else "") + key
    return out


_TYPE_NAMES = ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
               (dict, "a table"), (list, "an array"), ((datetime.date, datetime.time), "a date/time"))


def type_name(value) -> str:
    """How a TOML value's type is named in messages (bool before int: a bool is an int in Python)."""
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)), type(value).__name__)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class FileResult:
    entries: list[Entry]          # the valid entries
    errors: list[str]             # `FILE:LINE: message`, in line order
    defined: list[tuple[str, int]]  # every unit name defined, valid or not, with its line


def check_document(file: str, text: str) -> FileResult:
    try:
        return _check_document(file, text)
    except RecursionError:  # tomllib and the key scanner recurse once per nesting level
        return FileResult([], [f"{file}: arrays or inline tables nested too deeply to read "
                                  "(a policy needs two levels at most)"], [])
    except MemoryError:
        return FileResult([], [f"{file}: too large to check (out of memory)"], [])


def _check_document(file: str, text: str) -> FileResult:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, message = syntax_error_line(str(e), text)
        twice = defined_twice(text, line) if message.startswith(("Cannot declare", "Cannot overwrite", "Cannot redefine")) else None
        if twice is not None:
            message = f"{show_path(twice[0])}: defined twice (first at line {twice[1]})"
        return FileResult([], [f"{file}:{line}: {message}"], [])
    return _File(file, data, *scan(text)).run()


class _File:
    def __init__(self, file: str, data: dict, lines: dict, multiline: dict):
        self.file = file
        self.data = data
        self.lines = lines
        self.multiline = multiline
        self.errors: list[tuple[int, str]] = []
        self.defined: list[tuple[str, int]] = []

    def error(self, path: tuple, message: str, line: int | None = None) -> None:
        line = line_of(self.lines, path) if line is None else line
        where = f"{self.file}:{line}"
        self.errors.append((line, f"{where}: {show_path(path)}: {message}" if path else f"{where}: {message}"))

    def line(self, path: tuple) -> int:
        return line_of(self.lines, path)

    # -- generic shapes --------------------------------------------------------
    def table(self, value, path: tuple, what: str) -> dict | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected a table ({what}), got {type_name(value)}")
        return None

    def known_keys(self, table: dict, path: tuple, allowed: tuple) -> None:
        for key in table:
            if key not in allowed:
                hint = did_you_mean(suggestions(key, allowed))
                if not hint:
                    hint = "; allowed: " + ", ".join(allowed)
                self.error(path + (key,), f"unknown key '{key}'{hint}")

    def choice(self, value, path: tuple, key: str) -> str | None:
        options = CHOICES[key]
        if not isinstance(value, str):
            self.error(path, f"expected a string ({' or '.join(repr(o) for o in options)}), got {type_name(value)}")
        elif value not in options:
            self.error(path, f"must be {' or '.join(repr(o) for o in options)}, not {value!r}"
                       + did_you_mean(suggestions(value, options)))
        else:
            return value
        return None

    def capacity(self, value, path: tuple) -> int | None:
        if not _is_int(value):
            self.error(path, f"expected an integer (elements each @set can hold), got {type_name(value)}")
        elif not 1 <= value <= SET_CAPACITY_MAX:
            self.error(path, f"{value} is out of range (1..{SET_CAPACITY_MAX})")
        else:
            return value
        return None

    def log_limit(self, value, path: tuple) -> int | None:
        from ..program_contract import LOG_LIMIT_MAX

        if not _is_int(value):
            self.error(path, f"expected an integer (drop events per second / at once), got {type_name(value)}")
        elif not (lo := 0 if path[-1] == "log_rate" else 1) <= value <= LOG_LIMIT_MAX:
            self.error(path, f"{value} is out of range ({lo}..{LOG_LIMIT_MAX}; log_rate = 0 turns drop events off)")
        else:
            return value
        return None

    def flag(self, value, path: tuple) -> bool | None:
        if isinstance(value, bool):
            return value
        self.error(path, f"expected true or false, got {type_name(value)}")
        return None

    def capacity_cost(self, body: dict, path: tuple, checked, settings: dict) -> None:
        """The set_capacity's kernel memory, bounded unless force_capacity = true (see capacity.py)."""
        kinds = _set_kinds(checked)
        capacity = settings["set_capacity"]
        here = "set_capacity" in body
        try:
            check_capacity(kinds, capacity, settings["force_capacity"],
                           "" if here else f"set_capacity {capacity} (from [defaults])", "force_capacity = true")
        except CapacityError as e:
            self.error(path + ("set_capacity",) if here else path, str(e))

    def settings(self, table: dict, path: tuple, base: dict) -> dict:
        """backend, mode, set_capacity, log_rate… of `table` over `base`; bad values keep the base."""
        out = dict(base)
        for key in DEFAULT_KEYS:
            if key in table:
                value = (self.capacity(table[key], path + (key,)) if key == "set_capacity"
                         else self.flag(table[key], path + (key,)) if key == "force_capacity"
                         else self.log_limit(table[key], path + (key,)) if key in LOG_KEYS
                         else self.choice(table[key], path + (key,), key))
                if value is not None:
                    out[key] = value
        return out

    # -- the document ----------------------------------------------------------
    def run(self) -> FileResult:
        self.known_keys(self.data, (), TOP_KEYS)
        defaults = dict(BUILTIN_DEFAULTS)
        if "defaults" in self.data:
            table = self.table(self.data["defaults"], ("defaults",),
                               "backend, mode, set_capacity, force_capacity, log_rate, log_burst, compiler")
            if table is not None:
                self.known_keys(table, ("defaults",), DEFAULT_KEYS)
                defaults = self.settings(table, ("defaults",), defaults)
        entries = []
        units = self.table(self.data.get("units", {}), ("units",), 'one [units."NAME"] table per unit')
        for name, body in (units or {}).items():
            entry = self.unit(name, body, defaults)
            if entry is not None:
                entries.append(entry)
        errors = [text for _, text in sorted(self.errors, key=lambda e: e[0])]
        return FileResult(entries, errors, self.defined)

    def unit(self, name: str, body, defaults: dict) -> Entry | None:
        path = ("units", name)
        errors_before = len(self.errors)
        self.defined.append((name, self.line(path)))
        try:
            unitkey.validate(name, allow_glob=True)
        except unitkey.UnitNameError as e:
            self.error(path, str(e))
        else:
            if not unitkey.is_pattern(name) and not name.endswith(UNIT_SUFFIXES):
                self.error(path, f"'{name}' is not a unit name: it must end in "
                           + ", ".join(UNIT_SUFFIXES[:-1]) + f" or {UNIT_SUFFIXES[-1]}")
        body = self.table(body, path, "ingress, egress, params, sets, mode, backend, set_capacity, force_capacity, "
                                      "cgroup, log_rate, log_burst, strict, ip_address_allow, ip_address_deny, compiler")
        if body is None:
            return None
        self.known_keys(body, path, UNIT_KEYS)
        settings = self.settings(body, path, defaults)
        texts = {}
        for direction in ("ingress", "egress"):
            value = body.get(direction)
            if value is not None and not isinstance(value, str):
                self.error(path + (direction,), f"expected a string (a filter expression), got {type_name(value)}")
            else:
                texts[direction] = value
        bad_lists = len(self.errors)
        addresses = self.addresses(body, path)
        bad_lists = len(self.errors) > bad_lists
        if "ingress" not in body and "egress" not in body and addresses is None and not bad_lists:
            if any(k in body for k in ADDRESS_KEYS):
                self.error(path, "ip_address_allow alone lets every packet pass (as IPAddressAllow= without "
                           "IPAddressDeny= does); add ip_address_deny (e.g. [\"any\"]), ingress or egress")
            else:
                self.error(path, "give ingress, egress or both (each a filter expression)")
        cgroup = self.cgroup(body.get("cgroup"), path + ("cgroup",), name)
        strict = self.strict(body, path, name)
        checked = self.expressions(path, texts)
        if addresses is not None and checked is not None:
            texts, checked = self.with_addresses(path, addresses, checked)
        params = self.params(body, path, checked)
        sets = self.sets(body, path, checked, settings["set_capacity"])
        if checked is not None:
            self.capacity_cost(body, path, checked, settings)
        if len(self.errors) > errors_before:
            return None
        return Entry(name=name, ingress=texts.get("ingress"), egress=texts.get("egress"),
                     params=params, sets=sets, mode=settings["mode"], backend=settings["backend"],
                     set_capacity=settings["set_capacity"], cgroup=cgroup, file=self.file,
                     log={k: settings[k] for k in LOG_KEYS if k in settings}, compiler=settings.get("compiler"),
                     line=self.line(path), checked=checked, strict=bool(strict))

    def strict(self, body: dict, path: tuple, name: str) -> bool | None:
        """`strict = true`: only a slice default has descendants to hold back (see judge.py)."""
        if "strict" not in body:
            return False
        value = self.flag(body["strict"], path + ("strict",))
        if value and not is_slice_name(name):
            self.error(path + ("strict",), f"strict = true is only for slice defaults (an entry whose name ends in "
                       f"{SLICE_SUFFIX}, e.g. [units.\"system.slice\"]); {name} names units, not slices")
            return None
        return value

    def addresses(self, body: dict, path: tuple) -> str | None:
        """systemd's address lists as one expression (systemd.py), or None when they deny nothing."""
        lists = {}
        for key in ADDRESS_KEYS:
            value = body.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.error(path + (key,), f"expected an array of strings (addresses, networks, any, localhost, "
                           f"link-local, multicast), got {type_name(value)}")
                return None
            try:
                lists[key] = prefixes(value)
            except ValueError as e:
                self.error(path + (key,), str(e))
                return None
        return address_filter(lists["ip_address_allow"], lists["ip_address_deny"])

    def with_addresses(self, path: tuple, addresses: str, checked: tuple) -> tuple[dict, tuple | None]:
        """Each direction's filter with the address filter in front: both must pass, as systemd's
        firewall and a unit's own IP*FilterPath= programs both must."""
        texts = {d: combine(addresses, c.text if c is not None else None)
                 for d, c in zip(("ingress", "egress"), checked, strict=True)}
        try:
            return texts, analyze_pair(texts["ingress"], texts["egress"])
        except LangError as e:
            self.error(path, f"with ip_address_allow/ip_address_deny: {e.message}")
            return texts, None

    def cgroup(self, value, path: tuple, name: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string (a glob on the cgroup path), got {type_name(value)}")
            return None
        parts = value[1:].split("/") if value.startswith("/") else value.split("/")
        if not value or not all(parts):
            self.error(path, f"{value!r} is not a cgroup path glob: no empty components "
                       "(e.g. 'user@1000.service/app.slice/*')")
            return None
        last = parts[-1]
        if "**" not in parts and not _may_meet(last, name):
            self.error(path, f"{value!r} never matches {name}: it is matched against the path of the "
                       f"unit's own cgroup, which ends in {name}; did you mean '{value}/*'?")
            return None
        return value

    def expressions(self, path: tuple, texts: dict) -> tuple | None:
        """Both checked expressions, or None after reporting what is wrong in each."""
        try:
            return analyze_pair(texts.get("ingress"), texts.get("egress"))  # the common case: checked once
        except LangError:
            pass
        failed = False
        for direction in ("ingress", "egress"):  # one at a time, so both directions' errors are reported
            if texts.get(direction) is not None:
                failed |= self.analyzed(path, {direction: texts[direction]}) is None
        return None if failed else self.analyzed(path, texts)

    def analyzed(self, path: tuple, texts: dict) -> tuple | None:
        try:
            return analyze_pair(texts.get("ingress"), texts.get("egress"))
        except LangError as e:
            # The cross-direction set check points into egress without naming it.
            direction = e.direction or ("egress" if e.text is not None and e.text == texts.get("egress") else None)
            where = path + (direction,) if direction else path
            line, col = None, e.col
            if col is not None and where in self.multiline:
                # Point at the line of the file the column falls on, and the column within it.
                before = (e.text or "")[:col - 1]
                line = self.multiline[where] + before.count("\n")
                col -= before.rfind("\n") + 1
            self.error(where, (f"column {col}: " if col is not None else "") + e.message, line)
            return None

    def params(self, body: dict, path: tuple, checked) -> dict[str, int]:
        path = path + ("params",)
        table = self.table(body.get("params", {}), path, "name = number")
        if table is None or checked is None:
            return {}
        used = _used(checked, "params")
        out = {}
        for name, value in table.items():
            if name not in used:
                self.error(path + (name,), _unknown("parameter", "$", name, used))
            elif not _is_int(value):
                self.error(path + (name,), f"expected an integer (the value of ${name}), got {type_name(value)}")
            elif not 0 <= value <= PARAM_MAX:
                self.error(path + (name,), f"param ${name}: {value} is out of range (0..{PARAM_MAX})")
            else:
                out[name] = value
        for name, direction in used.items():
            if name not in table:
                how = f"{name} = NUMBER" if "params" in body else f"params = {{ {name} = NUMBER }}"
                self.error(path, f"${name} (used by {direction}) has no value; add {how}")
        return out

    def sets(self, body: dict, path: tuple, checked, capacity: int) -> dict[str, list]:
        path = path + ("sets",)
        table = self.table(body.get("sets", {}), path, "name = [elements]")
        if table is None or checked is None:
            return {}
        used = _used(checked, "sets")
        kinds = _set_kinds(checked)
        out = {}
        for name, value in table.items():
            where = path + (name,)
            if name not in used:
                self.error(where, _unknown("set", "@", name, used))
                continue
            if not isinstance(value, list):
                self.error(where, f"expected an array (the elements of @{name}), got {type_name(value)}")
                continue
            elements, ok = [], True
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, (str, int)):
                    self.error(where + (i,), f"expected a string or an integer, got {type_name(item)}")
                    ok = False
                    continue
                try:
                    elements += parse_set_elements(name, kinds[name], str(item))
                except LangError as e:
                    self.error(where + (i,), str(e))
                    ok = False
            if not ok:
                continue
            count = set_count(kinds[name], elements)
            if count > capacity:
                self.error(where, f"@{name} holds {count} elements; set_capacity is {capacity}")
                continue
            out[name] = elements
        for name, direction in used.items():
            if name not in table:
                how = f"{name} = [...]" if "sets" in body else f"sets = {{ {name} = [...] }}"
                self.error(path, f"@{name} (used by {direction}) is not given; add {how} "
                           "(an empty list is allowed)")
        return out


def _used(checked: tuple, what: str) -> dict[str, str]:
    """Params or sets the expressions use → the direction that uses it first."""
    out: dict[str, str] = {}
    for direction, c in zip(("ingress", "egress"), checked, strict=False):
        if c is not None:
            for name in c.params if what == "params" else c.sets:
                out.setdefault(name, direction)
    return out


def _set_kinds(checked: tuple) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for c in checked:
        if c is not None:
            kinds.update(c.sets)
    return kinds


def _unknown(what: str, sigil: str, name: str, used: dict) -> str:
    hint = did_you_mean(suggestions(name, list(used)))
    have = ", ".join(sigil + n for n in used) or "none"
    return f"unknown {what} {sigil}{name}: the expressions do not use it (they use: {have}){hint}"


def _may_meet(glob: str, name: str) -> bool:
    """Can one cgroup name match both the last component of the cgroup glob and the unit glob?
    Exact when either is a plain name; when both are globs, assumed yes."""
    if not unitkey.is_pattern(glob):
        return fnmatch.fnmatchcase(glob, name)
    if not unitkey.is_pattern(name):
        return fnmatch.fnmatchcase(name, glob)
    return True
