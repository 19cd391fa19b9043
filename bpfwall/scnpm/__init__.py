"""`bpfwall import-scnpm`: scnpm comment rules → an equivalent bpfwall policy file.

systemd-cgroup-nftables-policy-manager ("scnpm") reads comment lines of an
nftables.conf such as

    # postfix.service :: add rule inet filter vpn.whitelist \\
    #   socket cgroupv2 level 2 "system.slice/postfix.service" tcp dport 25 accept

and adds the rule (at the end of its chain) whenever the unit (re)starts. The
importer turns each unit's rules into one `[units."postfix.service"]` entry
whose expressions say exactly what nft decides for the unit's packets:

* the whole ruleset counts, not only the unit's rules: every base chain on the
  hooks the unit's packets pass (output and postrouting: egress; prerouting and
  input: ingress), every rule in order, jumps, gotos, returns and policies are
  followed as nft does (flow.py). A direction is in the entry when one of the
  unit's rules is reached from a base chain on its hooks. `--hook CHAIN=input|output`
  makes a chain the file does not hook a base chain; a chain named input or
  output that the file never declares is taken at its word. `--default` replaces
  the policy of the base chains that reach the unit's rules.
* `socket cgroupv2 level N "PATH"` becomes `cgroup = "PATH"` (its last
  component must be the unit); other rules' cgroup matches hold or not for it.
* a rule on the path with no exact translation (an interface, conntrack, …)
  refuses the unit's entry, naming the line; a rule of the unit's own that
  cannot be translated is left out and reported (`--partial` prints the rest).

Every unit's entry is checked with the policy checker before it is printed and
left out (reported, exit 2) if it does not pass, so what the importer prints
always passes `bpfwall policy check`. A set larger than the default
set_capacity raises the entry's set_capacity to what the set holds.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from .. import unitkey
from ..errors import Error
from ..lang.checker import analyze_pair
from ..lang.errors import LangError
from ..build import DEFAULT_SET_CAPACITY
from ..lang.values import SET_NUMBER_MAX, parse_set_elements
from ..policy.match import UNIT_SUFFIXES
from ..capacity import UNFORCED_LIMIT, estimate as capacity_cost, show_bytes
from ..lang.setcontents import count as key_count
from ..policy.schema import SET_CAPACITY_MAX, check_document
from .flow import HOOKS, Flow, Refused
from .ruleset import FAMILIES, Rule, Ruleset, ScnpmRule, scnpm_rules, tokenize
from .translate import Translation, Untranslatable, address_element, any_service, number_item, translate

DIRECTION_OF_HOOK = {"input": "ingress", "output": "egress"}


class ScnpmError(Error):
    """The file cannot be imported at all (unreadable, no scnpm rules, bad option)."""


@dataclass
class Problem:
    file: str
    line: int
    text: str    # the rule as written (after "add rule")
    why: str

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def as_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "rule": self.text, "why": self.why}


@dataclass
class _Unit:
    name: str
    cgroup: str | None = None
    cgroup_line: int = 0
    own: dict = field(default_factory=dict)          # line -> Translation, None: left out
    chains: dict = field(default_factory=dict)       # key of a chain with its rules -> a line of one
    notes: dict = field(default_factory=dict)        # message -> lines it applies to
    set_kinds: dict = field(default_factory=dict)    # bpfwall set name -> (kind, nft name)
    left_out: list = field(default_factory=list)     # lines of rules not translated
    lines: list = field(default_factory=list)        # (line, text) of every rule, for comments


@dataclass
class ImportResult:
    toml: str
    problems: list[Problem]
    units: list[dict]

    def as_dict(self) -> dict:
        return {"toml": self.toml, "units": self.units, "problems": [p.as_dict() for p in self.problems]}


def import_file(path: str, default: str | None = None, hooks: list[str] | tuple = ()) -> ImportResult:
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise ScnpmError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ScnpmError(f"{path}: not UTF-8 text") from None
    return import_text(text, "<stdin>" if path == "-" else path, default, hooks)


def parse_hooks(hooks) -> dict[str, str]:
    out = {}
    for item in hooks:
        chain, eq, hook = item.partition("=")
        if not eq or not chain or hook not in DIRECTION_OF_HOOK:
            raise ScnpmError(f"--hook {item}: write CHAIN=input or CHAIN=output")
        out[chain] = hook
    return out


def import_text(text: str, file: str = "<stdin>", default: str | None = None,
                hooks: list[str] | tuple = ()) -> ImportResult:
    if default not in (None, "accept", "drop"):
        raise ScnpmError(f"--default {default}: accept or drop")
    hook_of = parse_hooks(hooks)
    rules, broken = scnpm_rules(text)
    if not rules and not broken:
        raise ScnpmError(f"{file}: no scnpm rules in it (comment lines '# UNIT :: add rule FAMILY TABLE CHAIN …')")
    ruleset = Ruleset(text)
    problems = [Problem(file, line, "", why) for line, why in broken + ruleset.problems]
    units: dict[str, _Unit] = {}
    for rule in rules:  # scnpm adds them after the file is loaded: after every rule of their chains
        unit = units.setdefault(rule.unit, _Unit(rule.unit))
        unit.lines.append((rule.line, rule.text))
        try:
            _add_rule(unit, rule, ruleset)
        except Untranslatable as e:
            problems.append(Problem(file, rule.line, rule.text, str(e)))
            unit.own[rule.line] = None
            unit.left_out.append(rule.line)
    how = _settle_hooks(ruleset, hook_of)
    rendered, summaries = [], []
    for unit in units.values():
        directions = _directions(unit, ruleset, how, problems, file)
        block, summary, why = _render_unit(unit, ruleset, directions, default, how, file, problems)
        if block is not None:
            errors = check_document(f"{file} (imported)", block).errors
            if errors:  # a bug in the importer: leave the unit out rather than print a policy that does not check
                block, why = None, f"internal error, the translation of {unit.name} does not check: {errors[0]}"
        if why is not None:
            problems.append(Problem(file, unit.lines[0][0], unit.lines[0][1], why))
        if block is not None:
            rendered.append(block)
            summaries.append(summary)
    problems = sorted({(p.line, p.why): p for p in problems}.values(), key=lambda p: p.line)
    toml = _header(file, problems) + "\n".join(rendered)
    return ImportResult(toml, problems, summaries)


# -- one rule -----------------------------------------------------------------

def _add_rule(unit: _Unit, rule: ScnpmRule, ruleset: Ruleset) -> None:
    """Put the rule at the end of its chain and translate it (Untranslatable: left out, reported)."""
    words = [w for w in tokenize(rule.text) if w != "\n"]
    inserted = words[:2] == ["insert", "rule"]
    if inserted:
        words = words[2:]
    if len(words) < 3 or words[0] not in FAMILIES:
        raise Untranslatable("expected FAMILY TABLE CHAIN after '::' (e.g. inet filter output)")
    family, table, chain = words[:3]
    # In nft whatever bpfwall makes of it: it may match other units' packets.
    rules = ruleset.ensure_chain(family, table, chain).rules
    rules.insert(0 if inserted else len(rules), Rule(rule.line, words[3:], unit.name))
    unit.own[rule.line] = None  # until it is known to translate
    try:
        unitkey.validate(unit.name, allow_glob=False)
    except unitkey.UnitNameError as e:
        raise Untranslatable(str(e)) from None
    if not unit.name.endswith(UNIT_SUFFIXES):
        raise Untranslatable(f"{unit.name} has no cgroup of its own that bpfwall polices "
                             f"(units ending in {', '.join(UNIT_SUFFIXES)})")
    if inserted:
        raise Untranslatable("insert puts the rule before the others; only 'add rule' keeps a known order")
    translation = translate(words[3:], family, ruleset.defines)
    cgroup = _rule_cgroup(unit, translation)
    for name, (kind, nft_name) in translation.sets.items():
        if unit.set_kinds.get(name, (kind, nft_name)) != (kind, nft_name):
            raise Untranslatable(f"set @{nft_name} is used as two kinds of set, or two sets share the name @{name}")
        _set_elements(ruleset, family, table, nft_name, kind)  # refuse elements bpfwall cannot hold, now
    unit.own[rule.line] = translation
    unit.chains.setdefault((family, table, chain), rule.line)
    unit.set_kinds.update(translation.sets)
    if cgroup is None:
        unit.notes.setdefault("no socket cgroupv2 match; translated as the unit's own traffic", []).append(rule.line)
    elif unit.cgroup is None:
        unit.cgroup, unit.cgroup_line = cgroup, rule.line
    if translation.verdict is None:
        unit.notes.setdefault("no verdict, so the rule decides nothing", []).append(rule.line)


def _settle_hooks(ruleset: Ruleset, hook_of: dict) -> dict:
    """Give a hook to the chains `--hook` names and to undeclared chains named input or output;
    {chain key: how its hook was found} for those."""
    how = {}
    for key, chain in ruleset.chains.items():
        if chain.hook is not None:
            continue
        if chain.name in hook_of:
            chain.hook = hook_of[chain.name]
            how[key] = f"--hook {chain.name}={chain.hook}"
        elif chain.name in DIRECTION_OF_HOOK and not chain.declared:
            chain.hook = chain.name
            how[key] = "not declared in the file; taken by its name"
    return how


def _directions(unit: _Unit, ruleset: Ruleset, how: dict, problems: list, file: str) -> dict:
    """{direction: [base chains reaching the unit's rules]}; a rule no such chain reaches is left out."""
    out: dict = {}
    for family, table, name in unit.chains:
        bases = [ruleset.chain(family, table, b) for b in ruleset.base_chains_reaching(family, table, name)]
        where = f"{family} {table} {name}"
        why = None
        if not bases:
            why = (f"cannot tell which hook chain {where} is on (the file declares no base chain that reaches it); "
                   f"give --hook {name}=input or --hook {name}=output")
        found = [d for d, hooks in HOOKS.items() if any(b.hook in hooks for b in bases)]
        if bases and not found:
            why = (f"chain {where} is on hook {bases[0].hook}; a unit's own traffic is seen on the "
                   "prerouting, input, output and postrouting hooks only")
        if why is not None:
            for rule_line, text in unit.lines:
                if rule_line in unit.own and unit.own[rule_line] is not None and \
                        _chain_of(text) == (family, table, name):
                    problems.append(Problem(file, rule_line, text, why))
                    unit.own[rule_line] = None
                    unit.left_out.append(rule_line)
        for d in found:
            out.setdefault(d, []).extend(b for b in bases if b.hook in HOOKS[d] and b not in out.get(d, []))
    return out


def _chain_of(text: str) -> tuple:
    return tuple(tokenize(text)[:3])


def _rule_cgroup(unit: _Unit, translation: Translation) -> str | None:
    """The cgroup path of the rule's `socket cgroupv2` match, checked against the unit."""
    if translation.cgroup is None:
        return None
    level, path = translation.cgroup
    path = path.strip("/")
    parts = path.split("/")
    if level != len(parts):
        raise Untranslatable(f"socket cgroupv2 level {level} with a path of {len(parts)} components never matches")
    if parts[-1] != unit.name:
        raise Untranslatable(f"the cgroup {path} is not the unit's own ({unit.name}); bpfwall attaches a unit's "
                             "filter to the unit's cgroup")
    if unit.cgroup is not None and unit.cgroup != path:
        raise Untranslatable(f"{unit.name} already has rules for cgroup {unit.cgroup} (line {unit.cgroup_line})")
    return path


def _set_elements(ruleset: Ruleset, family: str, table: str, nft_name: str, kind: str) -> list[str] | None:
    """The declared elements of a named set in bpfwall's notation; None if the file does not declare it."""
    words = ruleset.sets.get((family, table, nft_name))
    if words is None:
        return None
    out = []
    for word in words:
        if kind == "address":
            out += [str(n) for n in address_element(word.strip('"'), None)]
        else:
            out.append(number_item(word, 0, SET_NUMBER_MAX, any_service))
    return out


# -- one unit's entry ---------------------------------------------------------

def _describe(chain, policy: str, how: dict) -> str:
    said = how.get((chain.family, chain.table, chain.name))
    return f"{chain.where} (hook {chain.hook}, priority {chain.priority}, policy {policy}" + \
        (f"; {said})" if said else ")")


def _render_unit(unit: _Unit, ruleset: Ruleset, directions: dict, default: str | None, how: dict, file: str,
                 problems: list) -> tuple[str | None, dict | None, str | None]:
    """The TOML block of a unit, its summary, and why it has no block (if it has none)."""
    expressions, sets, comments, chains = {}, {}, [], {}
    for line, text in unit.lines:
        mark = "  (NOT TRANSLATED)" if line in unit.left_out else ""
        comments.append(f"# {file}:{line}: {text}{mark}")
    flow = Flow(ruleset, unit.name, unit.cgroup, unit.own)
    for direction in ("ingress", "egress"):
        if direction not in directions:
            continue
        if default is not None:
            flow.policies.update(((b.family, b.table, b.name), default) for b in directions[direction])
        try:
            bases = flow.bases(direction)
            expressions[direction] = flow.direction(direction)
        except Refused as e:
            problems.append(Problem(file, e.line, "", f"{e} (on the path of {unit.name}'s {direction} packets)"))
            return None, None, None
        described = [_describe(b, flow.policies.get((b.family, b.table, b.name)) or b.policy or "accept", how)
                     for b in bases]
        chains[direction] = [b.where for b in bases]
        comments.append(f"# {direction}: what nft decides for the unit's packets, through "
                        + ", then ".join(described))
        if expressions[direction] == "true":
            unit.notes.setdefault(f"every {direction} packet passes: no rule on its way drops it "
                                  "(--default drop makes the accept rules a whitelist)", [])
    for note, at in flow.notes.items():
        unit.notes.setdefault(note, []).extend(at)
    for name, (kind, nft_name, family, table) in flow.sets.items():
        if unit.set_kinds.get(name, (kind, nft_name)) != (kind, nft_name):
            return None, None, f"set @{nft_name} is used as two kinds of set, or two sets share the name @{name}"
        unit.set_kinds[name] = (kind, nft_name)
        try:
            elements = _set_elements(ruleset, family, table, nft_name, kind)
        except Untranslatable as e:
            return None, None, str(e)
        if elements is None:
            elements = []
            unit.notes.setdefault(f"set @{name} (nft set {nft_name}) has no elements in the file: "
                                  f"fill it with bpfwall set {unit.name} @{name}=…", [])
        sets[name] = elements
    for note, at in unit.notes.items():
        where = "" if not at else f"line{'s' if len(at) > 1 else ''} {', '.join(map(str, at))}: "
        comments.append(f"# note: {where}{note}")
    if not expressions:
        return None, None, None
    try:
        checked = analyze_pair(expressions.get("ingress"), expressions.get("egress"))
    except LangError as e:
        return None, None, f"the translated rules of {unit.name} do not check: {e}"
    # A set only a rule that decides nothing used is not in the expressions: a policy lists no such set.
    used = {name for c in checked if c is not None for name in c.sets}
    sets = {name: elements for name, elements in sets.items() if name in used}
    capacity, why = _set_capacity(sets, unit.set_kinds)
    if why is not None:
        return None, None, why
    forced = False
    if capacity is not None:
        comments.append(f"# note: set_capacity raised from {DEFAULT_SET_CAPACITY} to {capacity}, what the largest "
                        "set holds (each element takes kernel memory)")
        kinds = {name: unit.set_kinds[name][0] for name in sets}
        cost = capacity_cost(kinds, capacity)
        if cost > UNFORCED_LIMIT:
            forced = True
            comments.append(f"# note: these sets take about {show_bytes(cost)} of kernel memory, more than bpfwall "
                            "loads unless forced: force_capacity = true says so (shrink the sets to drop it)")
    lines = comments + [f"[units.{_toml_str(unit.name)}]"]
    if unit.cgroup and "/" in unit.cgroup:
        lines.append(f"cgroup = {_toml_str(unit.cgroup)}")
    summary = {"name": unit.name, "cgroup": unit.cgroup, "sets": sets}
    for direction, c in zip(("ingress", "egress"), checked, strict=False):
        if c is not None:
            lines.append(f"{direction} = {_toml_expression(c.text)}")
            summary[direction] = c.text
            summary[direction + "_chains"] = chains[direction]
    if sets:
        lines.append("sets = { " + ", ".join(f"{name} = [{', '.join(_toml_str(e) for e in elements)}]"
                                            for name, elements in sets.items()) + " }")
    if capacity is not None:
        lines.append(f"set_capacity = {capacity}")
    if forced:
        lines.append("force_capacity = true")
    summary["left_out"] = unit.left_out
    return "\n".join(lines) + "\n", summary, None


def _set_capacity(sets: dict, kinds: dict) -> tuple[int | None, str | None]:
    """The set_capacity the unit needs (None: the default holds every set), or why no capacity can."""
    need, largest = 0, None
    for name, elements in sets.items():
        kind = kinds[name][0]
        count = key_count(kind, [e for text in elements for e in parse_set_elements(name, kind, text)])
        if count > need:
            need, largest = count, name
    if need > SET_CAPACITY_MAX:
        return None, (f"set @{largest} (nft set {kinds[largest][1]}) holds {need} elements, more than a bpfwall "
                      f"set can ({SET_CAPACITY_MAX})")
    return (need if need > DEFAULT_SET_CAPACITY else None), None


def _header(file: str, problems: list[Problem]) -> str:
    lines = [f"# bpfwall policy imported from {file} (scnpm rules) by bpfwall import-scnpm.",
             "# Each unit's expressions decide what nft's chains decide for the unit's packets:",
             "# its rules and the file's, in nft's order, through jumps, returns and policies."]
    if problems:
        lines += ["#", "# Not translated:"] + [f"#   {p.where}: {p.why}" for p in problems]
    return "\n".join(lines) + "\n\n"


def _toml_expression(text: str, width: int = 90) -> str:
    """A short expression on one line; a long one as a multi-line string, one alternative (||) a line."""
    if len(text) <= width:
        return _toml_str(text)
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        depth += ch in "({"
        depth -= ch in ")}"
        if depth == 0 and text.startswith(" || ", k):
            parts.append(text[start:k])
            start = k + 4
    parts.append(text[start:])
    return '"""\n    ' + "\n    || ".join(parts) + '\n"""'


def _toml_str(text: str) -> str:
    """A TOML basic string (the escapes JSON uses are valid TOML escapes)."""
    import json

    return json.dumps(text, ensure_ascii=False)
