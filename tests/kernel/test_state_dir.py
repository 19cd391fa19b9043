"""The watcher's and the nft backend's state files: who may write them, and what bpfwall does
with a file it did not write as it is.

The attacks run as an unprivileged user (`setpriv --reuid=65534`), in a directory of this
test's under /tmp that everyone may write to (sticky, like /tmp itself): the state directory
given to bpfwall there is made, or swapped for a symlink, by that user. bpfwall must refuse it
with one line naming it and the fix, before anything is loaded or attached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

from bpfwall.backends import bpf
from bpfwall.watch.state import State
from tests.kernel.invoke import bpfwall, one_error_line
from tests.kernel.netns import listing
from tests.kernel.watcher import attached_id, mkcg, pinned_ids, unit, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True)


@pytest.fixture
def public():
    """A directory under /tmp that every user may write to (mode 1777, like /tmp)."""
    path = tempfile.mkdtemp(prefix="bpfwall-test-", dir="/tmp")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _made_by_nobody(public):
    as_nobody("mkdir", "-m", "700", f"{public}/state")
    return f"{public}/state", None, "is owned by nobody (uid 65534), not root"


def _symlink_by_nobody(public):
    as_nobody("mkdir", "-m", "700", f"{public}/mine")
    as_nobody("ln", "-s", f"{public}/mine", f"{public}/state")
    return f"{public}/state", None, f"is a symbolic link (to {public}/mine)"


def _open_to_all(public):
    os.mkdir(f"{public}/state")
    os.chmod(f"{public}/state", 0o777)  # an admin's mistake; the user plants a symlink in it
    as_nobody("ln", "-s", "/etc/shadow", f"{public}/state/planted")
    return f"{public}/state", None, "is accessible by group and others (mode 0777)"


def _parent_open_to_all(public):
    os.mkdir(f"{public}/shared")
    os.chmod(f"{public}/shared", 0o777)  # not sticky: the user may rename what is in it
    os.mkdir(f"{public}/shared/state", 0o700)
    return f"{public}/shared/state", f"{public}/shared, a directory above it,", "is writable by group and others (mode 0777)"


UNSAFE = {"made by the user": _made_by_nobody, "a symlink of the user's": _symlink_by_nobody,
          "open to everyone": _open_to_all, "below a directory open to everyone": _parent_open_to_all}


@pytest.mark.parametrize("make", UNSAFE.values(), ids=UNSAFE.keys())
def test_watcher_refuses_an_unsafe_state_dir(make, public, subtree, pin_root, policy_dir):
    state_dir, it, problem = make(public)
    write_policy(policy_dir, unit("app.service", ingress="udp"))
    cg = mkcg(subtree, "app.service")
    r = bpfwall("watch", "--once", "--cgroup-root", subtree, "--policy-dir", str(policy_dir),
                "--pin-root", pin_root, "--state-dir", state_dir)
    one_error_line(r, f"{state_dir}: refused: {it or f'the watcher state directory {state_dir}'} {problem}; fix: ")
    assert bpf.units(pin_root) == [] and attached_id(pin_root, cg) is None  # nothing loaded or attached
    assert set(os.listdir(state_dir)) <= {"planted"}  # bpfwall made nothing there


@pytest.mark.parametrize("make", UNSAFE.values(), ids=UNSAFE.keys())
def test_nft_backend_refuses_an_unsafe_state_dir(make, public):
    state_dir, it, problem = make(public)
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    try:
        r = bpfwall("--backend", "nft", "--table", table, "load", "a.service", "--ingress", "udp",
                    env={"BPFWALL_NFT_STATE_DIR": state_dir})
        one_error_line(r, f"{state_dir}: refused: {it or f'the nft state directory {state_dir}'} {problem}; fix: ")
        assert subprocess.run(["nft", "list", "table", "inet", table], capture_output=True).returncode != 0
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def test_the_state_dir_is_created_private(tmp_path, subtree, pin_root, policy_dir):
    write_policy(policy_dir, unit("app.service", ingress="udp"))
    state_dir = tmp_path / "run" / "bpfwall"
    r = bpfwall("watch", "--once", "--cgroup-root", subtree, "--policy-dir", str(policy_dir),
                "--pin-root", pin_root, "--state-dir", str(state_dir))
    assert r.returncode == 0, r.stderr
    for d in (state_dir, state_dir.parent):
        assert os.stat(d).st_mode & 0o777 == 0o700 and os.stat(d).st_uid == 0
    names = os.listdir(state_dir)
    assert all(os.stat(state_dir / n).st_mode & 0o777 == 0o600 for n in names)
    assert not [n for n in names if n.endswith(".tmp")]


# -- what is in the files -----------------------------------------------------------------------

@pytest.mark.parametrize("data", [b'{"pin_root": "%s", "units": []}', b'{"pin_root": "%s", "units": {"a.service": "x"}}',
                                  b'{"pin_root": "%s", "units": {"a.service": {"fingerprint": "ab", "backend": "bpf", '
                                  b'"programs": {"ingress": "1"}}}}'],
                         ids=["units a list", "record a string", "program id a string"])
def test_a_malformed_watcher_state_is_a_warning_and_rewritten(data, tmp_path, subtree, pin_root, policy_dir):
    """The watcher state is only a memory: a malformed one must not stop the watcher (a
    TypeError traceback did), which would leave new cgroups unfiltered."""
    write_policy(policy_dir, unit("app.service", ingress="udp"))
    cg = mkcg(subtree, "app.service")
    state = State(str(tmp_path / "state"), pin_root)
    os.makedirs(state.dir, mode=0o700)
    with open(state.path, "wb") as f:
        f.write(data.replace(b"%s", os.path.realpath(pin_root).encode()))
    r = bpfwall("watch", "--once", "--cgroup-root", subtree, "--policy-dir", str(policy_dir),
                "--pin-root", pin_root, "--state-dir", state.dir, env={"BPFWALL_LOG": "stderr"})
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and f"the watcher state {state.path} is unusable (" in r.stderr
    assert attached_id(pin_root, cg) == pinned_ids(pin_root, "app.service")["ingress"]
    again = State(state.dir, pin_root)
    assert again.read() is None and set(again.units) == {"app.service"}


def _with_checksum(body: bytes) -> bytes:
    """A state file whose checksum line matches its body: what a careful hand edit writes."""
    return json.dumps({"bpfwall": "nft-state", "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\n" + body


@pytest.fixture
def nft_table(tmp_path):
    table = f"bpfwall-test-{uuid.uuid4().hex[:10]}"
    env = {"BPFWALL_NFT_STATE_DIR": str(tmp_path / "nft-state"), "BPFWALL_BACKEND": "nft", "BPFWALL_NFT_TABLE": table}
    try:
        yield table, env, tmp_path / "nft-state" / f"{table}.json"
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)


def test_a_hand_edited_nft_state_is_not_restored(nft_table, temp_cgroup):
    """A state whose expression was edited by hand (here to `true`, which passes everything) is
    refused by `nft-restore` and the guard, and the table in nft is left as it is."""
    table, env, path = nft_table
    assert bpfwall("load", "a.service", "--ingress", "udp && local_port == 53", env=env).returncode == 0
    assert bpfwall("attach", "a.service", temp_cgroup.path, env=env).returncode == 0
    before = listing(table)
    path.write_bytes(path.read_bytes().replace(b'"udp && local_port == 53"', b'"true"'))
    for argv in (["nft-restore"], ["stats", "a.service"], ["attach", "a.service", temp_cgroup.path]):
        one_error_line(bpfwall(*argv, env=env), f"the nft state {path} was changed outside bpfwall or is damaged")
    assert listing(table) == before


def test_nft_state_with_wrong_types_is_one_line(nft_table, temp_cgroup):
    """Even with a matching checksum, a field of the wrong type or shape is refused, naming it: a
    level is written into nft syntax (the dispatch rule), so a string there could inject commands."""
    table, env, path = nft_table
    assert bpfwall("load", "a.service", "--ingress", "udp", env=env).returncode == 0
    assert bpfwall("attach", "a.service", temp_cgroup.path, env=env).returncode == 0
    before = listing(table)
    body = path.read_bytes().partition(b"\n")[2] if path.read_bytes().startswith(b'{"bpfwall"') else path.read_bytes()
    state = json.loads(body)
    for field, value, named in (("level", "1\nflush ruleset", "units.a.service.attached[0].level"),
                                ("id", str(state["units"]["a.service"]["attached"][0]["id"]),
                                 "units.a.service.attached[0].id"),
                                ("directions", "ingress", "units.a.service.attached[0].directions")):
        edited = json.loads(body)
        edited["units"]["a.service"]["attached"][0][field] = value
        path.write_bytes(_with_checksum(json.dumps(edited).encode()))
        for argv in (["nft-restore"], ["stats", "a.service"]):
            line = one_error_line(bpfwall(*argv, env=env), f"the nft state {path} is not a valid state: {named}")
            assert "Traceback" not in line
    assert listing(table) == before
