"""Reading an nftables.conf the way scnpm users write it.

Two things are read:

* the scnpm rules: comment lines `# <unit> :: [add [rule]] <family> <table> <chain> <rule…>`,
  continued on further comment lines while a line ends in a backslash (the format of
  systemd-cgroup-nftables-policy-manager, which adds them when the unit starts);
* the ruleset itself, in the `table … { chain … { … } }` block form and as flat commands
  (`add|create table|chain|rule|set|element`, `insert rule`, `flush ruleset|table|chain`,
  `define`): every chain with its hook, type, priority and policy and its rules in the order
  nft holds them, the elements of named sets and the defines.

What changes a ruleset in a way not modelled here (`delete`, `replace`, `include`, a rule
placed by handle, index or position) is reported as a problem with its line, never guessed.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
PRIORITY_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}

_START = re.compile(r"^\s*#+ *(\S+\.[A-Za-z]+) +:: +(.*)$")
_CONTINUED = re.compile(r"^\s*#+ ?(.*)$")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{};,\n]|!=|==|<=|>=|[<>=]|[^\s{};,"<>!=]+|!')
_SEPARATORS = ("\n", ";")
_PLACED = ("handle", "index", "position")


@dataclass
class ScnpmRule:
    line: int          # where the comment starts (1-based)
    unit: str
    text: str          # the rule after "add rule": FAMILY TABLE CHAIN …


@dataclass
class Rule:
    line: int
    words: list[str]           # what follows FAMILY TABLE CHAIN
    unit: str | None = None    # the unit whose scnpm comment adds it; None: the file's own rule


@dataclass
class Chain:
    family: str
    table: str
    name: str
    hook: str | None = None
    type: str | None = None
    priority: int = 0
    policy: str | None = None
    declared: bool = False     # by a chain block or `add chain`, not only named by a rule
    line: int = 0              # where it is declared (0: never)
    rules: list[Rule] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.family} {self.table} {self.name}"

    @property
    def jumps(self) -> set[str]:
        """Chain names this chain's rules jump or go to."""
        out = set()
        for rule in self.rules:
            out.update(w2 for w1, w2 in zip(rule.words, rule.words[1:], strict=False) if w1 in ("jump", "goto"))
        return out


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def scnpm_rules(text: str) -> tuple[list[ScnpmRule], list[tuple[int, str]]]:
    """The scnpm comment rules, and (line, why) for comment rules that are cut short."""
    rules, broken = [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _START.match(lines[i])
        start, i = i + 1, i + 1
        if not m:
            continue
        unit, body = m[1], m[2].rstrip()
        while body.endswith("\\"):
            body = body[:-1].rstrip()
            more = _CONTINUED.match(lines[i]) if i < len(lines) else None
            if more is None:
                broken.append((start, "the rule ends in '\\' but the next line is not a comment that continues it"))
                body = None
                break
            body += " " + more[1].strip()
            body = body.rstrip()
            i += 1
        if body is not None:
            rules.append(ScnpmRule(start, unit, re.sub(r"^add +(rule +)?", "", body)))
    return rules, broken


def _strip_comments(text: str) -> str:
    """The file without comments (scnpm rules included); a backslash-newline becomes a vertical
    tab, which is white space to the tokenizer but still counts as a line."""
    out = []
    for line in text.splitlines():
        in_quote, cut = False, len(line)
        for k, ch in enumerate(line):
            if ch == '"':
                in_quote = not in_quote
            elif ch == "#" and not in_quote:
                cut = k
                break
        out.append(line[:cut])
    return re.sub(r"\\[ \t]*\n", "\v", "\n".join(out))


def _priority(words: list[str]) -> int:
    """`priority 0`, `priority -150`, `priority filter + 10` → a number (0 when unreadable)."""
    try:
        k = words.index("priority")
        base = words[k + 1]
        value = PRIORITY_NAMES[base] if base in PRIORITY_NAMES else int(base)
        if k + 3 < len(words) and words[k + 2] in ("+", "-"):
            value += int(words[k + 3]) * (1 if words[k + 2] == "+" else -1)
        return value
    except (ValueError, IndexError, KeyError):
        return 0


class Ruleset:
    """The chains (with their rules in nft's order), named set elements and defines of one file,
    and (line, why) for each command that changes the ruleset in a way not modelled."""

    def __init__(self, text: str):
        self.chains: dict[tuple, Chain] = {}
        self.sets: dict[tuple, list[str]] = {}
        self.defines: dict[str, list[str]] = {}
        self.problems: list[tuple[int, str]] = []
        stripped = _strip_comments(text)
        starts = [m.end() for m in re.finditer(r"[\n\v]", stripped)]
        self.tokens, self.lines = [], []
        for m in _TOKEN.finditer(stripped):
            self.tokens.append(m[0])
            self.lines.append(bisect.bisect_right(starts, m.start()) + 1)
        self.pos = 0
        self._parse()

    # -- queries ---------------------------------------------------------------
    def chain(self, family: str, table: str, name: str) -> Chain | None:
        return self.chains.get((family, table, name))

    def ensure_chain(self, family: str, table: str, name: str) -> Chain:
        return self.chains.setdefault((family, table, name), Chain(family, table, name))

    def base_chains_reaching(self, family: str, table: str, name: str) -> list[str]:
        """Names of the chains with a hook from which `name` is reached by jumps (itself if it has one)."""
        found, seen, todo = [], set(), [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            chain = self.chain(family, table, current)
            if chain is not None and chain.hook is not None:
                found.append(current)
            todo += [n for (f, t, n), c in self.chains.items() if f == family and t == table and current in c.jumps]
        return sorted(found)

    # -- parsing ---------------------------------------------------------------
    def _peek(self, k: int = 0) -> str | None:
        return self.tokens[self.pos + k] if self.pos + k < len(self.tokens) else None

    def _line(self) -> int:
        return self.lines[min(self.pos, len(self.lines) - 1)] if self.lines else 1

    def _take(self) -> str | None:
        tok = self._peek()
        self.pos += 1
        return tok

    def _is_word(self, tok) -> bool:
        return tok is not None and tok not in _SEPARATORS and tok not in ("{", "}", ",")

    def _statement(self) -> list[str]:
        """Tokens up to the end of the statement, braces balanced (the closing '}' of a block stays)."""
        out, depth = [], 0
        while self._peek() is not None:
            tok = self._peek()
            if depth == 0 and (tok in _SEPARATORS or tok == "}"):
                break
            depth += tok == "{"
            depth -= tok == "}"
            out.append(self._take())
        return out

    def _names(self, count: int) -> tuple[str, list[str]]:
        """An optional family, then `count` names."""
        family = "ip"
        if self._peek() in FAMILIES and all(self._is_word(self._peek(k)) for k in range(1, count + 1)):
            family = self._take()
        return family, [self._take() for _ in range(count)]

    def _parse(self) -> None:
        while self._peek() is not None:
            line = self._line()
            word = self._take()
            if word in _SEPARATORS or word == "}":
                continue
            command = "add"
            if word in ("add", "create", "insert", "flush", "delete", "destroy", "replace"):
                command, word = word, self._take()
            if command in ("delete", "destroy", "replace") or word == "include":
                what = f"{command} {word}" if word != "include" else "include"
                self.problems.append((line, f"'{what}' changes the ruleset in a way the importer does not follow; "
                                            "import the ruleset as nft holds it (nft list ruleset)"))
                self._statement()
            elif command == "flush":
                self._flush(word)
            elif word == "table":
                family, (name,) = self._names(1)
                if self._peek() == "{":
                    self._take()
                    self._table_body(family, name)
            elif word == "chain":
                family, (table, name) = self._names(2)
                chain = self.ensure_chain(family, table, name)
                chain.declared, chain.line = True, chain.line or line
                if self._peek() == "{":
                    self._take()
                    self._chain_body(chain)
            elif word == "rule":
                family, (table, name) = self._names(2)
                words = self._statement()
                if any(w in _PLACED for w in words[:1]):
                    self.problems.append((line, f"a rule placed by {words[0]} (at a place only the running "
                                                "ruleset knows)"))
                    continue
                rule = Rule(line, words)
                chain = self.ensure_chain(family, table, name)
                if command == "insert":
                    chain.rules.insert(0, rule)
                else:
                    chain.rules.append(rule)
            elif word in ("set", "element"):
                family, (table, name) = self._names(2)
                if self._peek() == "{":
                    self._take()
                    self._set_body((family, table, name), element_list=word == "element")
            elif word == "define":
                name = self._take()
                if self._peek() == "=":
                    self._take()
                self.defines[name] = self._statement()
            else:
                self._statement()

    def _flush(self, word: str) -> None:
        if word == "ruleset":
            family = self._take() if self._peek() in FAMILIES else None
            doomed = [k for k in self.chains if family in (None, k[0])]
            for key in doomed:
                del self.chains[key]
            for key in [k for k in self.sets if family in (None, k[0])]:
                del self.sets[key]
        elif word == "table":
            family, (table,) = self._names(1)
            for chain in self.chains.values():
                if (chain.family, chain.table) == (family, table):
                    chain.rules.clear()
        elif word == "chain":
            family, (table, name) = self._names(2)
            chain = self.chain(family, table, name)
            if chain is not None:
                chain.rules.clear()
        self._statement()

    def _table_body(self, family: str, table: str) -> None:
        while self._peek() not in (None, "}"):
            word = self._take()
            if word in _SEPARATORS:
                continue
            if word == "chain" and self._peek(1) == "{":
                line = self._line()
                chain = self.ensure_chain(family, table, self._take())
                chain.declared, chain.line = True, chain.line or line
                self._take()
                self._chain_body(chain)
            elif word == "set" and self._peek(1) == "{":
                name = self._take()
                self._take()
                self._set_body((family, table, name), element_list=False)
            else:
                self._statement()  # maps, flowtables, flags…: braces included
        self._take()

    def _chain_body(self, chain: Chain) -> None:
        while self._peek() not in (None, "}"):
            if self._peek() in _SEPARATORS:
                self._take()
                continue
            line = self._line()
            words = self._statement()
            if words[:1] == ["type"] and "hook" in words:
                k = words.index("hook")
                chain.type = words[1] if len(words) > 1 else None
                chain.hook = words[k + 1] if k + 1 < len(words) else None
                chain.priority = _priority(words)
            elif words[:1] == ["policy"] and len(words) > 1:
                chain.policy = words[1]
            elif words[:1] in (["comment"], ["devices"], ["flags"]):
                continue
            elif words:
                chain.rules.append(Rule(line, words))
        self._take()

    def _set_body(self, key: tuple, element_list: bool) -> None:
        """`type …; flags …; elements = { … }` (or, for `add element`, the elements themselves)."""
        elements = self.sets.setdefault(key, [])
        if element_list:
            elements += self._elements()
            return
        while self._peek() not in (None, "}"):
            word = self._take()
            if word == "elements" and self._peek() == "=" and self._peek(1) == "{":
                self.pos += 2
                elements += self._elements()
            elif word not in _SEPARATORS:
                self._statement()
        self._take()

    def _elements(self) -> list[str]:
        """Elements up to the closing '}' (consumed); attributes like `timeout 1h` are dropped."""
        out, current = [], []
        while self._peek() not in (None, "}"):
            tok = self._take()
            if tok == ",":
                out += current[:1]
                current = []
            elif tok not in _SEPARATORS:
                current.append(tok)
        out += current[:1]
        self._take()
        return out
