"""The Debian package `make deb` builds: lintian's verdict, what it installs where, and its man
pages as man renders them. Installing, running and purging it under a real systemd is
tests/systemd/test_deb_installed.py."""
from __future__ import annotations

import gzip
import re
import subprocess

import pytest

from bpfwall.cli import build_parser
from bpfwall.manpage import commands
from bpfwall.policy import schema

pytestmark = pytest.mark.package

UNITS = ("bpfwall.service", "bpfwall@.service", "bpfwall-metrics.service", "bpfwall-metrics.timer")


@pytest.fixture(scope="module")
def tree(built_deb, tmp_path_factory):
    """The package's files, unpacked."""
    out = tmp_path_factory.mktemp("deb-tree")
    subprocess.run(["dpkg-deb", "-x", str(built_deb), str(out)], check=True)
    return out


def test_lintian_reports_nothing_but_explained_overrides(built_deb, tree):
    proc = subprocess.run(["lintian", "-I", "--fail-on", "error,warning", str(built_deb)],
                          capture_output=True, text=True, timeout=300)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert (proc.returncode, tags) == (0, []), proc.stdout + proc.stderr
    # Every override carries its reason: a comment right above it.
    overrides = (tree / "usr/share/lintian/overrides/bpfwall").read_text().splitlines()
    for i, line in enumerate(overrides):
        if line.startswith("bpfwall:"):
            assert i > 0 and overrides[i - 1].startswith("#"), line


def test_package_puts_each_part_where_it_is_looked_for(tree):
    assert (tree / "usr/bin/bpfwall").stat().st_mode & 0o111
    assert (tree / "usr/bin/bpfwall").read_text().startswith("#!/usr/bin/python3")
    assert (tree / "usr/lib/python3/dist-packages/bpfwall/cli.py").is_file()
    assert (tree / "usr/share/bpfwall/bpf/port_filter.c").is_file()  # build.source_dir() under sys.prefix
    assert (tree / "usr/share/doc/bpfwall/examples/policy/50-example.toml").is_file()
    assert (tree / "usr/share/bash-completion/completions/bpfwall").is_file()
    assert (tree / "etc/bpfwall").is_dir() and not list((tree / "etc/bpfwall").iterdir())  # no live policy
    for unit in UNITS:
        text = (tree / "lib/systemd/system" / unit).read_text()
        assert "/usr/local" not in text, unit
        assert re.search(r"^ExecStart=/usr/bin/bpfwall ", text, re.M) or unit.endswith(".timer"), unit
    doc = (tree / "lib/systemd/system/bpfwall.service").read_text()
    assert "file:/usr/share/doc/bpfwall/README.md" in doc
    assert (tree / "usr/share/doc/bpfwall/README.md").is_file()  # not compressed: Documentation= names it


def test_maintainer_scripts_enable_and_start_nothing(built_deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(built_deb), str(tmp_path)], check=True)
    postinst = (tmp_path / "postinst").read_text()
    # Only "enable what the admin had enabled" (was-enabled) and "restart what runs" (try-restart).
    assert "deb-systemd-helper --quiet was-enabled 'bpfwall.service'" in postinst
    assert not re.search(r"deb-systemd-invoke (start|restart) ", postinst)
    assert "deb-systemd-invoke try-restart" in postinst


def rendered(page) -> tuple[str, str]:
    text = gzip.decompress(page.read_bytes()).decode()
    proc = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-"], input=text, capture_output=True,
                          text=True, env={"LC_ALL": "C.UTF-8", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def test_bpfwall_1_renders_without_warnings_and_has_every_command(tree):
    out, warnings = rendered(tree / "usr/share/man/man1/bpfwall.1.gz")
    assert warnings == ""
    names = [" ".join(words) for words, _, _ in commands(build_parser())]
    assert {"load", "unload", "watch", "apply", "dropin", "policy check", "metrics"} <= set(names)
    headings = set(re.findall(r"^   (\S.*)$", out, re.M))  # subsections: three spaces in
    assert [n for n in names if n not in headings] == []
    for section in ("SYNOPSIS", "GLOBAL OPTIONS", "COMMANDS", "FILTER LANGUAGE", "ENVIRONMENT", "EXIT STATUS"):
        assert re.search(rf"^{section}$", out, re.M), section
    assert "--pin-root DIR" in out and "remote_port" in out


def test_bpfwall_toml_5_renders_without_warnings_and_has_every_key(tree):
    out, warnings = rendered(tree / "usr/share/man/man5/bpfwall.toml.5.gz")
    assert warnings == ""
    described = set(re.findall(r"^       ([a-z_]+)(?:$| )", out, re.M))  # a key heads its paragraph
    assert set(schema.DEFAULT_KEYS) | set(schema.UNIT_KEYS) <= described
    assert '[units."nginx.service"]' in out  # the example policy
