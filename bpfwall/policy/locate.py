"""Line numbers for TOML keys, which tomllib does not report.

`key_lines(text)` scans a document tomllib has already accepted and maps every
key path to the 1-based line where it is defined:

    [units."nginx.service"]          ("units", "nginx.service")            → 1
    ingress = "tcp"                  ("units", "nginx.service", "ingress") → 2
    params = { port = 80 }           (…, "params", "port")                 → 3
    units."a.service".egress = "udp" dotted keys, at any level

Array elements get their index as a path component. Because the text is known
to be valid TOML, the scanner can be lenient: it only has to find where keys
start, not to reject anything.
"""
from __future__ import annotations

import bisect
import re

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}
_SCALAR = re.compile(r"[^,\]}#\n]*")
_TOML_ERROR_AT = re.compile(r"\(at line (\d+), column (\d+)\)")


def syntax_error_line(message: str, text: str) -> tuple[int, str]:
    """tomllib's "… (at line N, column M)" → (N, message without the position)."""
    m = _TOML_ERROR_AT.search(message)
    if m:
        return int(m[1]), message[:m.start()].rstrip()
    if "(at end of document)" in message:
        return max(1, text.count("\n") + (0 if text.endswith("\n") else 1)), \
            message.replace("(at end of document)", "").rstrip() + " (at the end of the file)"
    return 1, message


def key_lines(text: str) -> dict[tuple, int]:
    return scan(text)[0]


def scan(text: str) -> tuple[dict[tuple, int], dict[tuple, int]]:
    """(key path → line, key path → line where the content of its multi-line string starts).
    The second map is for pointing into a multi-line value; strings with a line-ending
    backslash are left out of it (the backslash joins lines)."""
    scanner = _Scanner(text)
    return scanner.run(), scanner.multiline


def defined_twice(text: str, line: int) -> tuple[tuple, int] | None:
    """For tomllib's "Cannot declare … twice" / "Cannot overwrite a value" at `line`: the key
    defined again there and the line of its first definition (None if the scan cannot tell)."""
    scanner = _Scanner(text)
    try:
        scanner.run()
    except (ValueError, IndexError):  # the scanner expects valid TOML; this text is not
        return None
    found = [(path, seen[0]) for path, seen in scanner.occurrences.items() if line in seen[1:]]
    if not found:
        return None
    return max(found, key=lambda f: len(f[0]))


def line_of(lines: dict[tuple, int], path: tuple) -> int:
    """The line of `path`, or of its longest prefix that has one (1 if none)."""
    for n in range(len(path), 0, -1):
        line = lines.get(tuple(path[:n]))
        if line is not None:
            return line
    return 1


class _Scanner:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self.lines: dict[tuple, int] = {}
        self.array_tables: dict[tuple, int] = {}
        self.multiline: dict[tuple, int] = {}
        self.occurrences: dict[tuple, list[int]] = {}

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.newlines, pos) + 1

    def record(self, path: tuple, pos: int) -> None:
        line = self.line(pos)
        self.lines.setdefault(path, line)
        seen = self.occurrences.setdefault(path, [])
        if not seen or seen[-1] != line:
            seen.append(line)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def skip(self, newlines: bool) -> None:
        """Skip blanks and comments (and newlines, when allowed)."""
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.pos += 1
            elif ch == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def run(self) -> dict[tuple, int]:
        table: tuple = ()
        while True:
            self.skip(newlines=True)
            if self.pos >= len(self.text):
                return self.lines
            start = self.pos
            if self.peek(2) == "[[":
                self.pos += 2
                path = self.key()
                self.pos += 2  # "]]"
                index = self.array_tables.get(path, -1) + 1
                self.array_tables[path] = index
                self.record(path, start)
                table = path + (index,)
                self.record(table, start)
            elif self.peek() == "[":
                self.pos += 1
                table = self.key()
                self.pos += 1  # "]"
                self.record(table, start)
            else:
                self.pair(table)

    def pair(self, table: tuple) -> None:
        start = self.pos
        path = table + self.key()
        for n in range(len(table) + 1, len(path) + 1):
            self.record(path[:n], start)
        self.skip(newlines=False)
        self.pos += 1  # "="
        self.skip(newlines=False)
        self.value(path)

    def key(self) -> tuple:
        """A dotted key; leaves pos after its last part (and trailing blanks)."""
        parts = []
        while True:
            self.skip(newlines=False)
            ch = self.peek()
            if ch == '"':
                parts.append(self.basic_string())
            elif ch == "'":
                end = self.text.index("'", self.pos + 1)
                parts.append(self.text[self.pos + 1:end])
                self.pos = end + 1
            else:
                m = _BARE.match(self.text, self.pos)
                parts.append(m[0] if m else "")
                self.pos = m.end() if m else self.pos
            self.skip(newlines=False)
            if self.peek() != ".":
                return tuple(parts)
            self.pos += 1

    def basic_string(self) -> str:
        out, i = [], self.pos + 1
        while self.text[i] != '"':
            ch = self.text[i]
            if ch == "\\":
                code = self.text[i + 1]
                if code in "uU":
                    width = 4 if code == "u" else 8
                    out.append(chr(int(self.text[i + 2:i + 2 + width], 16)))
                    i += 2 + width
                    continue
                out.append(_ESCAPES.get(code, code))
                i += 2
                continue
            out.append(ch)
            i += 1
        self.pos = i + 1
        return "".join(out)

    def items(self, close: str, newlines: bool, each) -> None:
        """Comma-separated items up to `close` (an array or an inline table); each(index) reads one."""
        self.pos += 1
        index = 0
        while True:
            self.skip(newlines)
            if self.peek() == close:
                self.pos += 1
                return
            if self.peek() == ",":
                self.pos += 1
                continue
            each(index)
            index += 1

    def value(self, path: tuple) -> None:
        ch = self.peek()
        if self.peek(3) in ('"""', "'''"):
            quote = self.peek(3)
            end = self.pos + 3
            while True:  # a backslash may escape a quote in """ strings
                end = self.text.index(quote, end)
                if quote == "'''" or not _escaped(self.text, end):
                    break
                end += 1
            while self.text[end + 3:end + 4] == quote[0]:  # up to two quotes may end the content
                end += 1
            content = self.pos + 3
            if self.text[content:content + 1] == "\n":  # TOML drops a newline right after the quotes
                content += 1
            elif self.text[content:content + 2] == "\r\n":
                content += 2
            if quote == "'''" or not re.search(r"\\[ \t]*\r?\n", self.text[content:end]):
                self.multiline[path] = self.line(content)
            self.pos = end + 3
        elif ch == '"':
            self.basic_string()
        elif ch == "'":
            self.pos = self.text.index("'", self.pos + 1) + 1
        elif ch == "[":
            def element(index: int) -> None:
                self.record(path + (index,), self.pos)
                self.value(path + (index,))
            self.items("]", True, element)
        elif ch == "{":
            self.items("}", False, lambda index: self.pair(path))
        else:  # number, boolean, date: up to the next delimiter
            m = _SCALAR.match(self.text, self.pos)
            self.pos = m.end()


def _escaped(text: str, quote_at: int) -> bool:
    n, i = 0, quote_at - 1
    while text[i] == "\\":
        n += 1
        i -= 1
    return n % 2 == 1
