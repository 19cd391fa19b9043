"""Reading an nftables.conf the way scnpm users write it.

Two things are read:

* the scnpm rules: comment lines `# <unit> :: [add [rule]] <family> <table> <chain> <rule…>`,
  continued on further comment lines while a line ends in a backslash (the format of
  systemd-cgroup-nftables-policy-manager, which applies them when the unit starts);
* the rest of the file, just enough to know each chain's hook and policy, which chain
  jumps to which, the elements of named sets and `define`d variables — both the
  `table … { chain … { … } }` block form and flat `add chain|rule|set|element` commands.

Anything else in the file is skipped: this is not an nft syntax checker.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")

_START = re.compile(r"^\s*#+ *(\S+\.[A-Za-z]+) +:: +(.*)$")
_CONTINUED = re.compile(r"^\s*#+ ?(.*)$")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{};,\n]|!=|==|<=|>=|[<>=]|[^\s{};,"<>!=]+|!')
_SEPARATORS = ("\n", ";")


@dataclass
class ScnpmRule:
    line: int          # where the comment starts (1-based)
    unit: str
    text: str          # the rule after "add rule": FAMILY TABLE CHAIN …


@dataclass
class Chain:
    hook: str | None = None
    policy: str | None = None
    jumps: set = field(default_factory=set)   # chain names this chain jumps or goes to


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
    """The file without comments (scnpm rules included) and with backslash-newlines joined."""
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
    return re.sub(r"\\[ \t]*\n", " ", "\n".join(out))


class Ruleset:
    """Chains (hook, policy, jumps), named set elements and defines of one file."""

    def __init__(self, text: str):
        self.chains: dict[tuple, Chain] = {}
        self.sets: dict[tuple, list[str]] = {}
        self.defines: dict[str, list[str]] = {}
        self.tokens = tokenize(_strip_comments(text))
        self.pos = 0
        self._parse()

    # -- queries ---------------------------------------------------------------
    def chain(self, family: str, table: str, name: str) -> Chain | None:
        return self.chains.get((family, table, name))

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
            word = self._take()
            if word in _SEPARATORS or word == "}":
                continue
            if word in ("add", "create", "insert", "replace"):
                word = self._take()
            if word == "table":
                family, (name,) = self._names(1)
                if self._peek() == "{":
                    self._take()
                    self._table_body(family, name)
            elif word == "chain":
                family, (table, name) = self._names(2)
                chain = self.chains.setdefault((family, table, name), Chain())
                if self._peek() == "{":
                    self._take()
                    self._chain_body(chain)
            elif word == "rule":
                family, (table, name) = self._names(2)
                self._rule(self.chains.setdefault((family, table, name), Chain()), self._statement())
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

    def _table_body(self, family: str, table: str) -> None:
        while self._peek() not in (None, "}"):
            word = self._take()
            if word in _SEPARATORS:
                continue
            if word == "chain" and self._peek(1) == "{":
                chain = self.chains.setdefault((family, table, self._take()), Chain())
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
            words = self._statement()
            if words[:1] == ["type"] and "hook" in words:
                chain.hook = words[words.index("hook") + 1] if words.index("hook") + 1 < len(words) else None
            elif words[:1] == ["policy"] and len(words) > 1:
                chain.policy = words[1]
            else:
                self._rule(chain, words)
        self._take()

    def _rule(self, chain: Chain, words: list[str]) -> None:
        for k, word in enumerate(words[:-1]):
            if word in ("jump", "goto"):
                chain.jumps.add(words[k + 1])

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
