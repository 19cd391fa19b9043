"""The optional Python modules (pyproject.toml's extras): declared, and when one is missing the
code says which package brings it instead of failing with an ImportError."""
from __future__ import annotations

import io
import sys
import tomllib
from pathlib import Path

import pytest

from bpfwall.nft import runner
from bpfwall.nft.errors import NftError
from bpfwall.watch import log as log_mod

REPO = Path(__file__).resolve().parents[2]


def test_extras_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["systemd"] == ["systemd-python"]
    assert extras["nft"] == []  # python3-nftables is not on PyPI: the extra documents it, pip cannot install it
    assert extras["bcc"] == []  # nor is python3-bpfcc
    assert not any(d.startswith(("systemd", "nftables")) for d in project["dependencies"])


@pytest.fixture
def no_nftables(monkeypatch):
    monkeypatch.setitem(sys.modules, "nftables", None)  # `import nftables` now fails, as if not installed


def test_missing_nftables_in_process_is_one_clear_error(no_nftables):
    with pytest.raises(NftError) as e:
        runner.InProcess()
    assert str(e.value) == runner.MISSING_NFTABLES and "python3-nftables" in str(e.value)


def test_missing_nftables_starts_no_worker(no_nftables):
    worker = runner.Worker()
    with pytest.raises(NftError, match="python3-nftables"):
        worker.json([{"list": {"tables": {"family": "inet"}}}], "listing tables")
    assert worker.proc is None


def test_log_says_when_systemd_python_is_missing(monkeypatch, tmp_path):
    socket_path = tmp_path / "journal-socket"
    socket_path.touch()
    monkeypatch.setattr(log_mod, "JOURNAL_SOCKET", str(socket_path))
    monkeypatch.setenv("BPFWALL_LOG", "journal")
    monkeypatch.setitem(sys.modules, "systemd", None)
    out = io.StringIO()
    log = log_mod.Log(stream=out)
    assert not log.to_journal
    log.info("attach", "a.service → /x (ingress)")
    assert out.getvalue().splitlines() == [f"warning: log: {log_mod.MISSING_SYSTEMD}", "attach: a.service → /x (ingress)"]
    assert "python3-systemd" in log_mod.MISSING_SYSTEMD and "systemd-python" in log_mod.MISSING_SYSTEMD


def test_log_to_stderr_needs_no_systemd_python(monkeypatch):
    monkeypatch.setenv("BPFWALL_LOG", "stderr")
    monkeypatch.setitem(sys.modules, "systemd", None)
    out = io.StringIO()
    log_mod.Log(stream=out).info("attach", "x")
    assert out.getvalue() == "attach: x\n"
