"""Shared fixtures: each test gets its own pin root, cgroup and object cache, removed even on failure."""
from __future__ import annotations

import os
import shutil
import stat
import time
import uuid

import pytest

ROOT = os.geteuid() == 0

# CI runs the same examples every time (a red CI must be reproducible); local runs explore.
from hypothesis import settings as _hsettings

_hsettings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    _hsettings.load_profile("ci")


def pytest_collection_modifyitems(config, items):
    # `-m systemd` must select every test that boots a container, and `-m "not systemd"` none.
    unmarked = [item.nodeid for item in items
                if "systemd_rootfs" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("systemd")]
    if unmarked:
        raise pytest.UsageError(f"these tests boot a systemd container but are not marked systemd "
                                f"(pytestmark = pytest.mark.systemd): {', '.join(unmarked)}")
    if ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (BPF, cgroup2)")
    for item in items:
        if "kernel" in item.keywords or "traffic" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One object cache for the session: identical filters compile once."""
    path = tmp_path_factory.mktemp("bpfwall-cache")
    os.chmod(path, 0o700)
    old = os.environ.get("BPFWALL_CACHE_DIR")
    os.environ["BPFWALL_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BPFWALL_CACHE_DIR", None)
    else:
        os.environ["BPFWALL_CACHE_DIR"] = old


# Each run notes itself in $BPFWALL_TEST_RUNS; it then waits (at most ~10 s, a bound for a
# broken test, not a timing assertion) until `$BPFWALL_TEST_TOGETHER` runs have started, and
# notes "alone" when it gave up. A header holding 666 does not compile (alone or in a batch).
_CLANG_WRAPPER = """#!/bin/sh
runs="$BPFWALL_TEST_RUNS"
: > "$runs/run.$$"
n=0
while [ "$(ls "$runs" | grep -c '^run\\.')" -lt "${BPFWALL_TEST_TOGETHER:-1}" ]; do
    n=$((n + 1))
    if [ $n -gt 200 ]; then : > "$runs/alone.$$"; break; fi
    sleep 0.05
done
for a in "$@"; do
    case "$a" in -I*bpfwall-build-*|-I*bpfwall-batch-*) if cat "${a#-I}"/*.h | grep -q 666; then
        echo "error: planted failure" >&2; exit 1; fi;; esac
done
exec clang "$@"
"""


class ClangRuns:
    """The runs of the clang wrapper: count() those started ("run") or that gave up waiting ("alone")."""

    def __init__(self, directory):
        self.dir = directory

    def count(self, kind: str = "run") -> int:
        return sum(name.startswith(kind + ".") for name in os.listdir(self.dir))


@pytest.fixture
def clang_runs(tmp_path, monkeypatch) -> ClangRuns:
    """clang behind a wrapper, as BPFWALL_CLANG (a new file: a compiler identity of its own, so
    every build misses the cache); BPFWALL_TEST_TOGETHER=n makes each run wait for n of them."""
    wrapper, runs = tmp_path / "clang-wrapper", tmp_path / "runs"
    wrapper.write_text(_CLANG_WRAPPER)
    wrapper.chmod(stat.S_IRWXU)
    runs.mkdir()
    monkeypatch.setenv("BPFWALL_CLANG", str(wrapper))
    monkeypatch.setenv("BPFWALL_TEST_RUNS", str(runs))
    return ClangRuns(runs)


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory):
    """The Debian package `make deb` builds from this tree, once per session, in a directory of
    its own. A missing build tool fails (make setup installs them), it does not skip."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(repo), "deb", f"DEB_DIR={out}"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"make deb failed (make setup installs what it needs):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}",
                    pytrace=False)
    debs = sorted(out.glob("bpfwall_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def _bpffs() -> None:
    if not os.path.ismount("/sys/fs/bpf"):
        os.system("mount -t bpf -o mode=0700 bpf /sys/fs/bpf")


@pytest.fixture
def pin_root(cache_dir):
    """A pin root of our own; every unit in it is unloaded (detached) and the root removed."""
    _bpffs()
    path = f"/sys/fs/bpf/bpfwall-test-{uuid.uuid4().hex[:10]}"
    old = os.environ.get("BPFWALL_PIN_ROOT")
    os.environ["BPFWALL_PIN_ROOT"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("BPFWALL_PIN_ROOT", None)
        else:
            os.environ["BPFWALL_PIN_ROOT"] = old
        if os.path.isdir(path):
            from bpfwall.backends import bpf

            try:
                loaded = bpf.units(path)
            except Exception:  # e.g. a test's unprivileged user made it: refused, but ours to remove
                loaded = []
            for unit in loaded:
                try:
                    bpf.unload(path, unit)
                except Exception:
                    pass
            shutil.rmtree(path)


def _trusted_base() -> str | None:
    """A directory bpfwall trusts for policy files (owned by root or us, and every directory above
    it too, none writable by others); pytest's tmp_path is under the world-writable /tmp."""
    from bpfwall.errors import UserError
    from bpfwall.kernel import safefs
    from bpfwall.policy.load import RULES

    for base in (["/run"] if ROOT else []) + [os.environ.get("XDG_RUNTIME_DIR"), os.path.expanduser("~")]:
        if not base:
            continue
        try:
            os.close(safefs.open_dir(base, RULES, listing=False))
            return base
        except (UserError, OSError):
            continue
    return None


@pytest.fixture
def trusted_tmp_path():
    """A fresh directory (0700) where bpfwall accepts policy files; removed after the test."""
    import tempfile
    from pathlib import Path

    base = _trusted_base()
    if base is None:
        assert not ROOT, "/run is not a directory bpfwall trusts for policy files"
        pytest.skip("no directory bpfwall trusts for policy files: $XDG_RUNTIME_DIR and $HOME are writable by others")
    path = tempfile.mkdtemp(prefix="bpfwall-test-policy-", dir=base)
    try:
        yield Path(path)
    finally:
        shutil.rmtree(path)


@pytest.fixture
def events_state_dir(trusted_tmp_path, monkeypatch):
    """Where this test's readers of drop events meet (fanout.py: <state dir>/events), not
    /run/bpfwall; bpfwall processes inherit the variable."""
    path = trusted_tmp_path / "state"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("BPFWALL_STATE_DIR", str(path))
    return path


@pytest.fixture
def temp_cgroup():
    from bpfwall.sandbox import TempCgroup

    with TempCgroup("bpfwall-test") as cg:
        yield cg


def kernel_object_ids() -> tuple[frozenset, frozenset]:
    from bpfwall.kernel import progs

    out = []
    for next_id in (progs.prog_get_next_id, progs.map_get_next_id):
        ids, cur = set(), 0
        while (cur := next_id(cur)) is not None:
            ids.add(cur)
        out.append(frozenset(ids))
    return out[0], out[1]


@pytest.fixture
def no_leaks():
    """Programs and maps alive after the test are exactly those alive before it.

    cgroup teardown releases attached programs from a workqueue, so wait a little.
    """
    before = kernel_object_ids()
    yield
    deadline = time.monotonic() + 5
    while True:
        after = kernel_object_ids()
        if after[0] <= before[0] and after[1] <= before[1]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked programs {sorted(after[0] - before[0])}, maps {sorted(after[1] - before[1])}")
        time.sleep(0.05)


def _ours_on_disk() -> set[str]:
    """Pin roots, cgroups, network namespaces and nft tables the tests create (named 'bpfwall-test…')."""
    from bpfwall.kernel import cgroup

    found = set()
    for top in ("/sys/fs/bpf", cgroup.cgroup2_mount(), "/run/netns"):
        if os.path.isdir(top):
            found |= {os.path.join(top, n) for n in os.listdir(top) if n.startswith("bpfwall-test")}
    return found | _our_nft_tables()


def _our_nft_tables() -> set[str]:
    try:
        import nftables
    except ImportError:
        return set()
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, _ = nft.cmd("list tables")
    if rc != 0 or not out:
        return set()
    import json

    return {f"nft table {t['table']['family']} {t['table']['name']}"
            for t in json.loads(out)["nftables"]
            if "table" in t and t["table"]["name"].startswith("bpfwall-test")}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """The whole suite leaves no programs, maps, pins or cgroups of its own behind."""
    if not ROOT:
        yield
        return
    _bpffs()
    before_ids, before_disk = kernel_object_ids(), _ours_on_disk()
    yield
    deadline = time.monotonic() + 5
    while True:
        ids, disk = kernel_object_ids(), _ours_on_disk()
        if ids[0] <= before_ids[0] and ids[1] <= before_ids[1] and disk <= before_disk:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the test suite left behind programs {sorted(ids[0] - before_ids[0])}, "
                f"maps {sorted(ids[1] - before_ids[1])}, paths {sorted(disk - before_disk)}")
        time.sleep(0.1)
