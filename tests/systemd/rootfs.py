"""The Debian root file system the systemd tests boot, built once and cached.

bpfwall runs inside the container, so the tree holds what it needs at run
time: python3 with tomllib (3.11), pyelftools and python-systemd, and clang
with the headers bpf/port_filter.c includes (linux/bpf.h and asm/types.h from
linux-libc-dev, bpf/bpf_helpers.h from libbpf-dev). Senders and receivers in
the tests are python3, so no netcat.

The cache directory is named after a hash of the recipe (suite, variant,
packages, post-processing version), so a changed recipe builds a new tree and
never reuses a stale one. A build goes to a temporary directory beside the
cache and is renamed into place when complete; a lock keeps two runs from
building at once. This module does not import bpfwall: `make rootfs` runs it
before the package is installed, e.g. `python3 tests/systemd/rootfs.py`.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
PACKAGES = (
    # systemd itself, logind (linger, user managers) and the D-Bus it needs
    "systemd", "systemd-sysv", "dbus", "libpam-systemd",
    # bpfwall inside: python3 3.11 (tomllib), its Debian modules, the BPF compiler and headers
    "python3", "python3-pyelftools", "python3-systemd", "python3-prometheus-client",
    "clang", "libbpf-dev", "linux-libc-dev", "libc6-dev",
    # looking around when a test fails
    "iproute2", "iputils-ping", "procps",
)
RECIPE_VERSION = 1  # bump when _finish() changes what the tree contains
CACHE_ROOT = Path("/var/cache/bpfwall-test")
# The tree must hold these before it is used (a half-built or foreign tree is refused).
REQUIRED_FILES = ("usr/lib/systemd/systemd", "usr/bin/python3", "usr/bin/clang",
                  "usr/include/bpf/bpf_helpers.h", "usr/include/linux/bpf.h", "usr/sbin/useradd")


class RootfsError(Exception):
    """The root file system could not be built or is unusable; the message says why."""


def recipe_hash() -> str:
    text = "\n".join([SUITE, VARIANT, str(RECIPE_VERSION), *sorted(PACKAGES)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path() -> Path:
    """Where the tree is (or will be): $BPFWALL_TEST_ROOTFS, else the cache named by the recipe."""
    env = os.environ.get("BPFWALL_TEST_ROOTFS")
    if env:
        return Path(env)
    return CACHE_ROOT / f"rootfs-{SUITE}-{recipe_hash()}"


def missing_files(root: Path) -> list[str]:
    return [f for f in REQUIRED_FILES if not (root / f).exists()]


def host_mirror() -> str | None:
    """The Debian archive the host's apt uses (so a local mirror or proxy is honoured).

    None lets debootstrap use its own default.
    """
    sources = Path("/etc/apt/sources.list.d")
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.sources")), *sorted(sources.glob("*.list"))]:
        try:
            texts.append(path.read_text())
        except OSError:
            pass
    for text in texts:
        # deb822: a stanza with "URIs:" whose Suites name the release itself (not -security).
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and not _disabled(stanza):
                return uris.group(1)
        # one-line format: deb [opts] URI SUITE COMPONENTS
        for line in text.splitlines():
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE:
                return m.group(1)
    return None


def _disabled(stanza: str) -> bool:
    return bool(re.search(r"^Enabled:\s*no", stanza, re.M | re.I))


def ensure(log=lambda msg: print(msg, file=sys.stderr)) -> tuple[Path, float | None]:
    """The cached tree, built first if needed: (path, build seconds or None when reused)."""
    root = cache_path()
    if not missing_files(root):
        return root, None
    if os.environ.get("BPFWALL_TEST_ROOTFS"):
        raise RootfsError(f"BPFWALL_TEST_ROOTFS={root} is not a usable tree (missing {', '.join(missing_files(root))})")
    for tool in ("debootstrap",):
        if not shutil.which(tool):
            raise RootfsError(f"{tool} is not installed: run `make setup` (apt-get install debootstrap)")
    root.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same tree: wait for it
        if not missing_files(root):
            return root, None
        _remove_stale_builds(root)
        started = time.monotonic()
        _build(root, log)
        return root, time.monotonic() - started


def _build(root: Path, log) -> None:
    tmp = root.parent / f".build-{root.name}-{uuid.uuid4().hex[:8]}"
    cmd = ["debootstrap", f"--variant={VARIANT}", f"--include={','.join(PACKAGES)}", SUITE, str(tmp)]
    mirror = host_mirror()
    if mirror:
        cmd.append(mirror)
    log(f"building the test root file system (one time, about a minute): {' '.join(cmd)}")
    logfile = root.parent / f"{root.name}.build.log"
    try:
        with open(logfile, "w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
            raise RootfsError(f"debootstrap failed (exit {proc.returncode}); see {logfile}: " + " | ".join(tail))
        _finish(tmp)
        if missing_files(tmp):
            raise RootfsError(f"the built tree lacks {', '.join(missing_files(tmp))}; see {logfile}")
        os.rename(tmp, root)
    finally:
        if tmp.exists():
            _remove_tree(tmp)


def _finish(tree: Path) -> None:
    """Make the tree smaller; what differs per run is written into each run's overlay instead."""
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    for lists in (tree / "var/lib/apt/lists").glob("*_Packages"):
        lists.unlink()


def _remove_stale_builds(root: Path) -> None:
    """Leftovers of a build that was killed (we hold the lock: no build is running)."""
    for stale in root.parent.glob(f".build-{root.name}-*"):
        _remove_tree(stale)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point.startswith(prefix):
                found.append(point)
    return found


def _remove_tree(path: Path) -> None:
    """rm -r that first unmounts what a killed debootstrap left mounted (its /proc, /sys)."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    if _mounts_under(path):
        raise RootfsError(f"cannot remove {path}: something is still mounted under it")
    shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    try:
        path, seconds = ensure()
    except RootfsError as e:
        print(f"rootfs: error: {e}", file=sys.stderr)
        return 1
    print(path if seconds is None else f"{path} (built in {seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
