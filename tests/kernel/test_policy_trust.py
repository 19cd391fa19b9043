"""Policy files an unprivileged user could have written are refused by `bpfwall policy check` and by
`bpfwall watch` (at start, and on SIGHUP where the running policy stays): a world-writable file, a
file owned by another user, a symlink to a user's file in /tmp. The attacker is a real unprivileged
process (setpriv, uid/gid 65534)."""
from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest

from bpfwall.backends import bpf
from tests.kernel.invoke import PYTHON, bpfwall
from tests.kernel.watcher import Daemon, attached_id, mkcg, pinned_ids, unit, wait_for

pytestmark = pytest.mark.kernel

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
GOOD = unit("a.service", ingress="udp && local_port == 53")
ACCEPT_ALL = unit("a.service", ingress="true")


def as_nobody(*argv, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([*AS_NOBODY, *argv], input=stdin, capture_output=True, text=True, timeout=60)


def overwrite_as_nobody(path, text: str) -> None:
    """The attack: an unprivileged user rewrites the file (it only works where the mode lets it)."""
    r = as_nobody("sh", "-c", 'cat > "$1"', "sh", str(path), stdin=text)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def policy_dir(trusted_tmp_path):
    """Like /etc/bpfwall: root's, 0755 all the way, so the user can reach the files."""
    os.chmod(trusted_tmp_path, 0o755)
    d = trusted_tmp_path / "policy"
    d.mkdir()
    (d / "10-a.toml").write_text(GOOD)
    return d


@pytest.fixture
def user_file():
    """A file an unprivileged user made in /tmp (removed after the test)."""
    path = f"/tmp/bpfwall-test-{uuid.uuid4().hex[:10]}.toml"
    r = as_nobody("sh", "-c", 'umask 022 && cat > "$1"', "sh", path, stdin=ACCEPT_ALL)
    assert r.returncode == 0, r.stderr
    try:
        yield path
    finally:
        os.unlink(path)


def world_writable(policy_dir, user_file) -> str:
    """A file the admin left 0666, rewritten by the user."""
    file = policy_dir / "10-a.toml"
    os.chmod(file, 0o666)
    overwrite_as_nobody(file, ACCEPT_ALL)
    return f"{file}: refused: the policy file is writable by group and others (mode 0666); fix: chmod go-w {file}"


def owned_by_nobody(policy_dir, user_file) -> str:
    """The user's file moved in as it is (mv keeps the owner), then rewritten by its owner."""
    file = policy_dir / "10-a.toml"
    os.chown(file, NOBODY, NOBODY)
    overwrite_as_nobody(file, ACCEPT_ALL)
    return f"{file}: refused: the policy file is owned by nobody (uid {NOBODY}), not root; fix: chown root:root {file}"


def symlink_to_tmp(policy_dir, user_file) -> str:
    """A link to the user's file in /tmp, in place of the policy file."""
    file = policy_dir / "10-a.toml"
    file.unlink()
    os.symlink(user_file, file)
    return (f"{file}: refused: the policy file is a symbolic link (to {user_file}), which lets whoever owns the "
            f"target change it; fix: replace it with a root-owned copy you have checked: "
            f"cp --remove-destination {user_file} {file}")


ATTACKS = [world_writable, owned_by_nobody, symlink_to_tmp]


@pytest.mark.parametrize("attack", ATTACKS)
def test_policy_check_refuses_what_a_user_could_write(policy_dir, user_file, attack):
    assert bpfwall("policy", "check", "--policy-dir", str(policy_dir)).returncode == 0
    expected = attack(policy_dir, user_file)
    r = bpfwall("policy", "check", "--policy-dir", str(policy_dir))
    assert (r.returncode, r.stdout, r.stderr) == (2, "", expected + "\n")
    # Naming the file does not get around it, nor do the other commands that read the policy.
    r = bpfwall("policy", "check", str(policy_dir / "10-a.toml"))
    assert (r.returncode, r.stderr) == (2, expected + "\n")
    r = bpfwall("policy", "show", "--policy-dir", str(policy_dir))
    assert (r.returncode, r.stderr) == (2, f"bpfwall: error: {expected}\n")


def test_a_policy_directory_in_tmp_is_refused(user_file):
    r = bpfwall("policy", "check", "--policy-dir", "/tmp")
    assert (r.returncode, r.stderr) == (2, "/tmp: refused: the policy directory /tmp is writable by group and others "
                                           "(mode 1777, shared like /tmp); fix: keep policy files where only root "
                                           "can write, e.g. in /etc/bpfwall\n")
    r = bpfwall("policy", "check", user_file)
    assert r.returncode == 2 and r.stderr.startswith(f"{user_file}: refused: its directory /tmp is writable")


def test_a_users_own_policy_is_trusted_by_that_user_only(trusted_tmp_path):
    """Owned by root OR the user bpfwall runs as (sshd's rule): a user may check a draft in their own
    directory; root refuses the same files."""
    os.chmod(trusted_tmp_path, 0o755)
    mine = trusted_tmp_path / "mine"
    mine.mkdir()
    (mine / "10-a.toml").write_text(GOOD)
    for path in (mine, mine / "10-a.toml"):
        os.chown(path, NOBODY, NOBODY)
    r = as_nobody(*bpfwall_argv("policy", "check", "--policy-dir", str(mine)))
    assert r.returncode == 0, r.stderr
    r = bpfwall("policy", "check", "--policy-dir", str(mine))
    assert (r.returncode, r.stderr) == (2, f"{mine}: refused: the policy directory {mine} is owned by nobody "
                                           f"(uid {NOBODY}), not root; fix: chown root:root {mine}\n")
    # A file of root's in it is fine for the user; a file of a third user's is not.
    os.chown(mine / "10-a.toml", 0, 0)
    assert as_nobody(*bpfwall_argv("policy", "check", "--policy-dir", str(mine))).returncode == 0
    os.chown(mine / "10-a.toml", 1, 1)
    r = as_nobody(*bpfwall_argv("policy", "check", "--policy-dir", str(mine)))
    assert r.returncode == 2 and "owned by daemon (uid 1), not root or nobody (uid 65534)" in r.stderr


def bpfwall_argv(*args) -> list[str]:
    return [PYTHON, "-m", "bpfwall", *args]


# -- the watcher ----------------------------------------------------------------

@pytest.fixture
def daemon(no_leaks, tmp_path, subtree, pin_root, policy_dir):
    d = Daemon(tmp_path, subtree, pin_root, policy_dir)
    try:
        yield d
    finally:
        d.close()


@pytest.mark.parametrize("attack", ATTACKS)
def test_watch_refuses_it_at_start_and_attaches_nothing(daemon, policy_dir, user_file, subtree, pin_root, attack):
    expected = attack(policy_dir, user_file)
    mkcg(subtree, "a.service")
    daemon.start(wait_ready=False)
    assert daemon.wait_exit() == 2
    assert daemon.log() == f"bpfwall: error: {expected}\n"
    assert not os.path.exists(pin_root) or bpf.units(pin_root) == []


@pytest.mark.parametrize("attack", ATTACKS)
def test_watch_refuses_it_on_sighup_and_keeps_the_running_policy(daemon, policy_dir, user_file, subtree, pin_root,
                                                                 attack):
    a = mkcg(subtree, "a.service")
    daemon.start()
    before = attached_id(pin_root, a)
    assert before == pinned_ids(pin_root, "a.service")["ingress"]
    expected = attack(policy_dir, user_file)
    daemon.signal(signal.SIGHUP)
    daemon.wait_message("RELOADING=1")
    daemon.wait_message("READY=1")
    assert f"warning: reload: {expected}; keeping the running policy" in daemon.log()
    assert attached_id(pin_root, a) == before == pinned_ids(pin_root, "a.service")["ingress"]
    again = mkcg(subtree, "x.slice/a.service")  # the old policy still serves new cgroups
    wait_for("new cgroup attached under the old policy", lambda: attached_id(pin_root, again) == before)
    assert "Traceback" not in daemon.log()
