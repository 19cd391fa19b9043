"""Every environment variable the code reads is in the README's table (issue 12: BPFWALL_LOG,
BPFWALL_CLANG and BPFWALL_SOURCE were read but written down nowhere)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Read, but not a setting: passed on to a child with bpfwall's own path added.
PASSED_ON = {"PYTHONPATH"}


def variables_read() -> dict[str, str]:
    """name → where: the constant names passed to os.environ.get/[]/os.getenv in bpfwall/."""
    found = {}
    for path in sorted((REPO / "bpfwall").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = ast.unparse(node.func)
                if func in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
                    name = node.args[0].value
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ") \
                    and isinstance(node.slice, ast.Constant) and isinstance(node.ctx, ast.Load):
                name = node.slice.value
            if isinstance(name, str):
                found.setdefault(name, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def documented() -> set[str]:
    text = (REPO / "README.md").read_text()
    table = text.split("### Environment variables", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))


def test_every_variable_read_is_documented():
    read = variables_read()
    assert {"BPFWALL_PIN_ROOT", "BPFWALL_LOG", "BPFWALL_CLANG"} <= set(read)  # the scan sees them
    missing = {name: where for name, where in read.items() if name not in documented() | PASSED_ON}
    assert missing == {}, f"read but not in the README's 'Environment variables' table: {missing}"


def test_the_table_lists_nothing_that_is_not_read():
    stale = documented() - set(variables_read())
    assert stale == set(), f"documented but never read: {stale}"
