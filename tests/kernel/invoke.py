"""Running bpfwall as its users do: in this process through cli.main (with pytest's capsys), or
as a subprocess of the repository's venv; and what a refusal must look like."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bpfwall import cli

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")


def run(capsys, *argv) -> tuple[int, str, str]:
    """`bpfwall ARGV` in this process: (exit status, stdout, stderr)."""
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *argv) -> str:
    """The stdout of `bpfwall ARGV` in this process, which must succeed."""
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    return out


def bpfwall(*args, env: dict | None = None, stdin: str | None = None, prefix=()) -> subprocess.CompletedProcess:
    """`[PREFIX…] python -m bpfwall ARGS` as a subprocess, `env` added to ours."""
    return subprocess.run([*prefix, PYTHON, "-m", "bpfwall", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=stdin, cwd=REPO, timeout=60)


def one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """The refusal every user error gets: exit status 2 and one `bpfwall: error:` line holding `words`."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpfwall: error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def pins_of(pin_root) -> list[str]:
    """Every file under a pin root."""
    out = []
    for top, _, files in os.walk(pin_root):
        out += [os.path.join(top, f) for f in files]
    return sorted(out)
