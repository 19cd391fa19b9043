"""`pip install .` into a plain venv (no system site packages, so none of Debian's python3-*
modules): the CLI and the bpf backend's C source are there, and a missing Debian-only binding is
one line naming the package to install. Offline: pip's isolated build takes setuptools and wheel
from Debian's /usr/share/python-wheels (python3-setuptools-whl, python3-wheel-whl), and
--no-deps leaves out pyelftools, which only compiling needs."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.package

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain-venv")
    src = root / "src"  # pip builds in the tree it is given: a copy, not the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.deb", "__pycache__", ".hypothesis"))
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(root / "venv")], check=True)
    pip = subprocess.run([str(root / "venv/bin/pip"), "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--no-index", "--find-links", "/usr/share/python-wheels", str(src)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(src)
    return root / "venv"


def run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin/bpfwall"), *args], capture_output=True, text=True, cwd="/", timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})


def test_cli_and_c_source_come_with_the_wheel(venv):
    assert run(venv, "check", "udp&&dst_port==53").stdout == "udp && dst_port == 53\n"
    where = subprocess.run([str(venv / "bin/python"), "-c", "import bpfwall.build as b; print(b.source_dir())"],
                           capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    assert where == str(venv / "share/bpfwall/bpf") and Path(where, "port_filter.c").is_file()


def test_a_missing_debian_binding_is_named_in_one_line(venv):
    metrics = run(venv, "metrics")
    assert metrics.returncode == 2 and metrics.stderr.count("\n") == 1, metrics.stderr
    assert "apt-get install python3-prometheus-client" in metrics.stderr and "`metrics` extra" in metrics.stderr
    nft = run(venv, "--backend", "nft", "--table", "bpfwall-pipvenv-test", "load", "a.service", "--ingress", "udp")
    assert nft.returncode == 2 and nft.stderr.count("\n") == 1, nft.stderr
    assert "apt-get install python3-nftables" in nft.stderr
