"""The `container` fixture: a real systemd booted with systemd-nspawn, one per test module.

Root only (skipped otherwise). Missing debootstrap or systemd-nspawn is a
failure, not a skip: `make setup` installs them, and a suite that silently
skips its systemd tier would hide exactly the bugs it exists for.
"""
from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

import pytest

from tests.systemd import container as ct
from tests.systemd import rootfs
from tests.systemd.container import REPO


@pytest.fixture(scope="session")
def systemd_rootfs() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (systemd-nspawn, BPF, cgroup2)")
    missing = ct.missing_tools() + [t for t in ("debootstrap",) if not shutil.which(t)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run `make setup` (installs debootstrap, systemd-container)",
                    pytrace=False)
    try:
        path, seconds = rootfs.ensure()
    except rootfs.RootfsError as e:
        pytest.fail(f"cannot build the test root file system: {e}", pytrace=False)
    if seconds is not None:
        print(f"\nbuilt {path} in {seconds:.0f} s")
    return path


@pytest.fixture(scope="module")
def container(systemd_rootfs):
    """A booted systemd (running or degraded) with bpfwall from this repository at /usr/local/bin/bpfwall."""
    c = ct.Container(systemd_rootfs, REPO)
    try:
        c.start()
    except ct.ContainerError as e:
        detail = "".join(traceback.format_exception_only(e))  # with the notes: console lines, teardown
        pytest.fail(f"the test container did not start: {detail}", pytrace=False)
    try:
        yield c
    finally:
        c.stop()
