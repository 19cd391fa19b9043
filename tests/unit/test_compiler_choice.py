"""Choosing a compiler (compilers.py), the kernel headers bcc gets (bcc_build.kernel_headers), and
`compiler =` in a policy. The builds themselves are tested against the kernel
(tests/kernel/test_compilers.py)."""
from __future__ import annotations

import os
import textwrap

import pytest

from bpfwall import bcc_build, compilers
from bpfwall.build import BuildError
from bpfwall.errors import UsageError
from bpfwall.policy import check_policy


def tree(root, *files: str) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("/* */\n")


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """An empty /lib/modules of our own; no kheaders, no BCC_KERNEL_SOURCE."""
    root = tmp_path / "modules"
    root.mkdir()
    monkeypatch.setattr(bcc_build, "MODULES", str(root))
    monkeypatch.setattr(bcc_build, "KHEADERS", str(tmp_path / "no-kheaders.tar.xz"))
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    return root


def split(root, release: str) -> None:
    """Debian's layout: the flavour's generated headers in build/, the rest in source/."""
    tree(root / release, "build/include/generated/autoconf.h", "source/include/linux/kconfig.h")


def test_the_running_kernels_headers_are_left_to_bcc(modules):
    split(modules, os.uname().release)
    split(modules, "99.0.0-1-amd64")
    assert bcc_build.kernel_headers() == bcc_build.Headers()


def test_else_the_newest_kernels_split_headers(modules):
    for release in ("6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"):
        split(modules, release)
    tree(modules / "6.1.0-11-amd64", "build/include/generated/autoconf.h")  # a tree without kconfig.h
    tree(modules / "7.0.0-1-amd64", "modules.dep")  # modules only: no headers at all
    headers = bcc_build.kernel_headers()
    newest = modules / "6.1.0-10-amd64"  # by version, not spelling: 10 > 9
    assert headers == bcc_build.Headers(source=str(newest / "source"), build=str(newest / "build"))
    assert f"-I{newest}/build/include" in headers.cflags()


def test_a_whole_tree_is_one_directory(modules):
    tree(modules / "6.12.0-1-amd64", "build/include/generated/autoconf.h", "build/include/linux/kconfig.h")
    assert bcc_build.kernel_headers() == bcc_build.Headers(source=str(modules / "6.12.0-1-amd64" / "build"))


def test_no_headers_say_what_is_missing_and_how_to_fix_it(modules):
    with pytest.raises(BuildError) as e:
        bcc_build.kernel_headers()
    message = str(e.value)
    assert f"the running kernel {os.uname().release}" in message
    assert "apt-get install linux-headers-" in message and "make setup" in message and "BCC_KERNEL_SOURCE" in message
    assert bcc_build.missing() == message  # what `auto` reports when clang is missing too


def test_bcc_kernel_source_is_checked(modules, tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path))
    with pytest.raises(BuildError, match="holds none"):
        bcc_build.kernel_headers()
    tree(tmp_path, "include/linux/kconfig.h")
    assert bcc_build.kernel_headers() == bcc_build.Headers(source=str(tmp_path))


def test_the_choice(monkeypatch):
    monkeypatch.delenv("BPFWALL_COMPILER", raising=False)
    assert compilers.override() is None
    monkeypatch.setenv("BPFWALL_COMPILER", "bcc")
    assert compilers.override() == "bcc"
    assert compilers.override("clang") == "clang"  # the command line's beats the environment's
    monkeypatch.setenv("BPFWALL_COMPILER", "gcc")
    with pytest.raises(UsageError, match="BPFWALL_COMPILER"):
        compilers.override()
    assert compilers.resolve("bcc") == "bcc"  # named: taken as it is, checked when it builds


def test_auto_without_any_compiler(modules, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError) as e:
        compilers.resolve("auto")
    assert "clang not found" in str(e.value) and "bcc needs kernel headers" in str(e.value)
    assert compilers.describe("auto").startswith("none (no compiler for BPF programs")


def policy(tmp_path, text: str):
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return check_policy(files=[str(path)])


def test_policy_compiler(trusted_tmp_path):
    result, errors = policy(trusted_tmp_path, """
        [defaults]
        compiler = "bcc"
        [units."a.service"]
        ingress = "tcp"
        [units."b.service"]
        ingress = "tcp"
        compiler = "clang"
    """)
    assert errors == []
    a, b = sorted(result.entries, key=lambda e: e.name)
    assert (a.compiler, b.compiler) == ("bcc", "clang")
    assert a.program().compiler == "bcc"
    assert a.program("clang").compiler == "clang"  # --compiler / $BPFWALL_COMPILER win
    assert a.filter_spec()["compiler"] == "bcc"  # a change of compiler reloads the unit


def test_policy_without_compiler_keeps_its_fingerprint(trusted_tmp_path):
    result, _ = policy(trusted_tmp_path, '[units."a.service"]\ningress = "tcp"\n')
    entry = result.entries[0]
    assert entry.compiler is None and "compiler" not in entry.filter_spec()
    assert entry.program().compiler == "auto"


def test_policy_compiler_must_be_known(trusted_tmp_path):
    _, errors = policy(trusted_tmp_path, '[defaults]\ncompiler = "gcc"\n')
    assert [e.replace(str(trusted_tmp_path) + "/", "") for e in errors] == [
        "p.toml:2: defaults.compiler: must be 'clang' or 'bcc' or 'auto', not 'gcc'; did you mean 'bcc'?"]
