"""Kill bpfwall at every step boundary of load, reload, attach and unload (and of the watcher's
start and SIGHUP), then check that what the kernel runs is still what the pins say.

The step boundaries are listed by running each command once with BPFWALL_CRASH_LOG; then, for
every boundary reached (and every time it is reached), the same command runs again from the
same starting state with BPFWALL_CRASH_AT=<step>#<n> and is SIGKILLed there. After each crash:

- named:        every program of the unit attached anywhere is named by a pin (a program pin,
                a staged next_<dir> pin, or a pinned link);
- not stacked:  no cgroup runs two programs of the unit in one direction;
- not unfiltered: every cgroup that was policed before the crash still runs one;
and the next plain run of the command completes: every attachment runs the pinned program.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import pytest

from bpfwall.backends import bpf
from bpfwall.kernel import cgroup, links, pins, progs
from bpfwall.sandbox import TempCgroup
from tests.kernel.watcher import Daemon, remove_tree, unit, wait_for, write_policy

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

EXE = os.path.join(os.path.dirname(sys.executable), "bpfwall")
UNIT = "crash.service"
V1 = ("udp && local_port == 1000", "tcp")
V2 = ("udp && local_port == 2000", "udp")


def bpfwall(pin_root, *args, crash=None, log=None, check=True):
    env = dict(os.environ, BPFWALL_PIN_ROOT=pin_root)
    env.pop("BPFWALL_CRASH_AT", None)
    if crash:
        env["BPFWALL_CRASH_AT"] = crash
    if log:
        env["BPFWALL_CRASH_LOG"] = log
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=120)
    if crash:
        assert proc.returncode == -signal.SIGKILL, f"{args} did not reach {crash}: {proc.stderr}"
    elif check:
        assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc


def load_args(version):
    ingress, egress = version
    return ["load", UNIT, "--ingress", ingress, "--egress", egress]


def steps_of(pin_root, tmp_path, *args) -> list[str]:
    """Every step boundary the command reaches, as BPFWALL_CRASH_AT values (step#n)."""
    log = tmp_path / "steps.log"
    log.unlink(missing_ok=True)
    bpfwall(pin_root, *args, log=str(log))
    seen = Counter()
    out = []
    for step in log.read_text().split():
        seen[step] += 1
        out.append(f"{step}#{seen[step]}")
    assert out, f"{args} reached no step boundary"
    return out


def pinned_names(pin_root) -> set[int]:
    """Ids of every program a pin of the unit names: program pins, staged ones, links."""
    ids = set()
    path = bpf.unit_dir(pin_root, UNIT)
    if not os.path.isdir(path):
        return ids
    for name in os.listdir(path):
        if name in bpf.DIRECTIONS or name.startswith(bpf.NEXT_PREFIX) or bpf.parse_link_name(name):
            fd = pins.get(os.path.join(path, name))
            try:
                ids.add(links.info(fd).prog_id if links.is_link(fd) else progs.prog_info(fd).id)
            finally:
                os.close(fd)
    return ids


def unit_programs_on(pin_root, path, direction) -> list[int]:
    name = bpf.program_name(pin_root, UNIT, direction)
    return [pid for pid in cgroup.query(path, direction)[1] if bpf.name_of(pid) == name]


def check_invariants(pin_root, policed: dict[str, set[str]], context: str) -> None:
    named = pinned_names(pin_root)
    for path, directions in policed.items():
        for direction in bpf.DIRECTIONS:
            on = unit_programs_on(pin_root, path, direction)
            assert len(on) <= 1, f"{context}: {path} runs {len(on)} programs of the unit ({direction})"
            assert set(on) <= named, f"{context}: {path} runs program {on} that no pin names ({direction})"
            if direction in directions:
                assert on, f"{context}: {path} lost its {direction} filter"


def holds(check, *args) -> bool:
    try:
        check(*args)
        return True
    except AssertionError:
        return False


def check_complete(pin_root, policed: dict[str, set[str]], context: str) -> None:
    """After a plain run: every attachment runs exactly the program pinned now."""
    with bpf.PinnedUnit.open(pin_root, UNIT) as u:
        ids = u.prog_ids()
        assert not u.staged, f"{context}: staged pins left: {u.staged}"
    for path, directions in policed.items():
        for direction in directions:
            assert unit_programs_on(pin_root, path, direction) == [ids[direction]], f"{context}: {path} {direction}"


@pytest.fixture
def two_cgroups():
    """A cgroup for bpfwall's own attachments, and one where systemd would put the unit (named
    after it, in a slice: where hand-off attachments are looked for)."""
    slice_ = os.path.join(cgroup.cgroup2_mount(), f"bpfwall-test-crash-{os.urandom(5).hex()}.slice")
    with TempCgroup("bpfwall-test-crash") as a:
        os.mkdir(slice_)
        try:
            os.mkdir(os.path.join(slice_, UNIT))
            yield a.path, os.path.join(slice_, UNIT)
        finally:
            os.rmdir(os.path.join(slice_, UNIT))
            os.rmdir(slice_)


def setup_attached(pin_root, linked: str, by_systemd: str) -> dict[str, set[str]]:
    """V1 loaded; attached to `linked` by bpfwall (a pinned link) and to `by_systemd` the way
    systemd's IP*FilterPath= does it (BPF_PROG_ATTACH, multi, of the pinned program)."""
    bpfwall(pin_root, *load_args(V1))
    bpfwall(pin_root, "attach", UNIT, linked)
    for direction in bpf.DIRECTIONS:
        fd = pins.get(bpf.prog_path(pin_root, UNIT, direction))
        try:
            cgroup.attach(by_systemd, fd, direction)
        finally:
            os.close(fd)
    return {linked: set(bpf.DIRECTIONS), by_systemd: set(bpf.DIRECTIONS)}


def reset(pin_root, paths) -> None:
    bpfwall(pin_root, "unload", UNIT, check=False)
    for path in paths:
        for direction in bpf.DIRECTIONS:
            assert unit_programs_on(pin_root, path, direction) == [], "unload left a program attached"


def test_reload_crash_at_every_step(pin_root, two_cgroups, tmp_path):
    linked, by_systemd = two_cgroups
    policed = setup_attached(pin_root, linked, by_systemd)
    steps = steps_of(pin_root, tmp_path, *load_args(V2))
    for kind in ("load:link-updated", "load:replaced", "load:staged", "load:swapped", "load:done"):
        assert any(s.startswith(kind + "#") for s in steps), f"{kind} not reached: {steps}"
    reset(pin_root, two_cgroups)
    for step in steps:
        policed = setup_attached(pin_root, linked, by_systemd)
        bpfwall(pin_root, *load_args(V2), crash=step)
        check_invariants(pin_root, policed, f"killed at {step}")
        stats = bpf.stats(pin_root, UNIT)  # readable after any crash, and says what runs
        assert {(a["cgroup"], a["direction"]) for a in stats["attached"]} == \
            {(p, d) for p, ds in policed.items() for d in ds}, step
        bpfwall(pin_root, *load_args(V2))  # the next load completes it
        check_invariants(pin_root, policed, f"load after {step}")
        check_complete(pin_root, policed, f"load after {step}")
        reset(pin_root, two_cgroups)


def test_first_load_crash_at_every_step(pin_root, tmp_path):
    steps = steps_of(pin_root, tmp_path, *load_args(V1))
    reset(pin_root, [])
    for step in steps:
        bpfwall(pin_root, *load_args(V1), crash=step)
        bpfwall(pin_root, *load_args(V1))  # a half-made directory is completed, never wedged
        assert bpf.stats(pin_root, UNIT)["ingress"] == V1[0]
        reset(pin_root, [])


def test_attach_crash_at_every_step(pin_root, two_cgroups, tmp_path):
    path = two_cgroups[0]
    bpfwall(pin_root, *load_args(V1))
    steps = steps_of(pin_root, tmp_path, "attach", UNIT, path)
    assert "attach:linked#1" in steps and "attach:pinned#2" in steps
    bpfwall(pin_root, "detach", UNIT, path)
    for step in steps:
        bpfwall(pin_root, "attach", UNIT, path, crash=step)
        # Killed before its link was pinned, an attach leaves nothing attached (the kernel
        # detaches an unpinned link with its process); after, the pin names what runs.
        check_invariants(pin_root, {path: set()}, f"attach killed at {step}")
        bpfwall(pin_root, "attach", UNIT, path)
        check_complete(pin_root, {path: set(bpf.DIRECTIONS)}, f"attach after {step}")
        bpfwall(pin_root, "detach", UNIT, path)


def test_unload_crash_at_every_step(pin_root, two_cgroups, tmp_path):
    linked, by_systemd = two_cgroups
    setup_attached(pin_root, linked, by_systemd)
    steps = steps_of(pin_root, tmp_path, "unload", UNIT)
    assert any(s.startswith("unload:detached#") for s in steps)
    for step in steps:
        policed = setup_attached(pin_root, linked, by_systemd)
        bpfwall(pin_root, "unload", UNIT, crash=step)
        check_invariants(pin_root, {p: set() for p in policed}, f"unload killed at {step}")
        bpfwall(pin_root, "unload", UNIT)  # completes it
        assert not os.path.exists(bpf.unit_dir(pin_root, UNIT))
        check_invariants(pin_root, {p: set() for p in policed}, f"unload after {step}")


def test_unload_finds_programs_whose_pins_are_gone(pin_root, two_cgroups):
    """Pins removed by hand (rm -r) while systemd and bpfwall attachments run: unload still
    removes the unit's programs from every cgroup, found by their names."""
    linked, by_systemd = two_cgroups
    setup_attached(pin_root, linked, by_systemd)
    subprocess.run(["rm", "-r", bpf.unit_dir(pin_root, UNIT)], check=True)
    # The link went with its pin (released from a kernel workqueue, shortly after the unlink);
    # systemd's attachment stays, now named by nothing.
    wait_for("the link to go with its pin", lambda: unit_programs_on(pin_root, linked, "ingress") == [])
    assert len(unit_programs_on(pin_root, by_systemd, "ingress")) == 1
    out = bpfwall(pin_root, "unload", UNIT).stdout
    assert "detached from 2 attachment(s)" in out
    for direction in bpf.DIRECTIONS:
        assert unit_programs_on(pin_root, by_systemd, direction) == []
    assert bpfwall(pin_root, "unload", UNIT, check=False).returncode == 2  # nothing left: not loaded


def test_stale_program_is_shown_and_swapped_not_stacked(pin_root, two_cgroups):
    """A program of the unit no pin names (left by a crash of an older bpfwall) on a cgroup:
    stats shows it as stale, attach swaps it in place instead of adding a second one."""
    path = two_cgroups[1]
    bpfwall(pin_root, *load_args(V1))
    fd = pins.get(bpf.prog_path(pin_root, UNIT, "ingress"))
    try:
        cgroup.attach(path, fd, "ingress")  # the old program, attached by PROG_ATTACH
        bpfwall(pin_root, *load_args(V2))   # finds and swaps it: reloads walk the tree
        assert unit_programs_on(pin_root, path, "ingress") != [progs.prog_info(fd).id]
        # Now plant the stale one again beside nothing: as a crash between swap and pin would.
        cgroup.detach_id(path, unit_programs_on(pin_root, path, "ingress")[0], "ingress")
        cgroup.attach(path, fd, "ingress")
        stats = bpf.stats(pin_root, UNIT)
        assert [a["current"] for a in stats["attached"]] == [False]
        assert "stale program id" in bpfwall(pin_root, "stats", UNIT).stdout
        bpfwall(pin_root, "attach", UNIT, path)
        check_complete(pin_root, {path: set(bpf.DIRECTIONS)}, "attach over a stale program")
    finally:
        os.close(fd)
        reset(pin_root, [path])


# -- the watcher ------------------------------------------------------------------------

def watcher_steps(daemon, tmp_path, then=None) -> list[str]:
    log = tmp_path / "watch-steps.log"
    log.unlink(missing_ok=True)
    os.environ["BPFWALL_CRASH_LOG"] = str(log)
    try:
        daemon.start()
        if then:
            then()
    finally:
        os.environ.pop("BPFWALL_CRASH_LOG")
    daemon.stop()
    seen, out = Counter(), []
    for step in log.read_text().split() if log.exists() else []:
        seen[step] += 1
        out.append(f"{step}#{seen[step]}")
    return out


@pytest.fixture
def watched(tmp_path, trusted_tmp_path, pin_root):
    root = TempCgroup("bpfwall-test-watchcrash")
    root.__enter__()
    policy_dir = trusted_tmp_path / "policy"  # policy files must live where only root writes
    policy_dir.mkdir()
    d = Daemon(tmp_path, root.path, pin_root, policy_dir)
    try:
        yield d
    finally:
        d.close()
        bpfwall(pin_root, "unload", UNIT, check=False)
        remove_tree(root.path)


def policy(d, version) -> None:
    write_policy(d.policy_dir, unit(UNIT, ingress=version[0], egress=version[1]))


def test_watcher_sighup_crash_at_every_step(watched, tmp_path, pin_root):
    """SIGHUP with a changed policy, the watcher killed at each step of the reload it makes;
    a restarted watcher then runs exactly the policy's programs, one per cgroup and direction."""
    d = watched
    cgs = [os.path.join(d.root, f"{i}", UNIT) for i in range(3)]
    for path in cgs:
        os.makedirs(path)
    policed = {p: set(bpf.DIRECTIONS) for p in cgs}

    def hup_and_wait():
        (tmp_path / "watch-steps.log").write_text("")  # count only the reload's steps
        policy(d, V2)
        d.signal(signal.SIGHUP)
        d.wait_message("READY=1")

    policy(d, V1)
    steps = watcher_steps(d, tmp_path, then=hup_and_wait)
    steps = [s for s in steps if s.startswith("load:")]
    assert steps, "the reload reached no step"
    for step in steps:
        policy(d, V1)
        d.start()
        check_complete(pin_root, policed, "watcher start")
        d.stop()
        # The crash point comes from the watcher's environment: start it with one. Starting
        # on an unchanged policy reuses what is pinned, so no load step is reached before the HUP.
        os.environ["BPFWALL_CRASH_AT"] = step
        try:
            d.start()
        finally:
            os.environ.pop("BPFWALL_CRASH_AT")
        policy(d, V2)
        d.signal(signal.SIGHUP)
        try:
            code = d.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the watcher did not reach {step}:\n{d.log()}") from None
        assert code == -signal.SIGKILL, f"{step}: exit {code}\n{d.log()}"
        check_invariants(pin_root, policed, f"watcher killed at {step}")
        d.start()  # restarted: completes the reload, stacks nothing
        check_invariants(pin_root, policed, f"watcher restarted after {step}")
        check_complete(pin_root, policed, f"watcher restarted after {step}")
        assert bpf.stats(pin_root, UNIT)["ingress"] == V2[0]
        d.stop()


def test_pins_removed_behind_a_running_watcher(watched, pin_root):
    """rm -r of a unit's pins while the watcher runs: the cgroups never run a program no pin
    names (the links went with their pins) and the watcher loads and attaches the unit again."""
    d = watched
    cgs = [os.path.join(d.root, f"{i}", UNIT) for i in range(3)]
    for path in cgs:
        os.makedirs(path)
    policed = {p: set(bpf.DIRECTIONS) for p in cgs}
    policy(d, V1)
    d.start()
    check_complete(pin_root, policed, "watcher start")
    subprocess.run(["rm", "-r", bpf.unit_dir(pin_root, UNIT)], check=True)
    # An unpinned link is released from a kernel workqueue: its detach follows the unlink shortly.
    wait_for("every program to be named by a pin again", lambda: holds(check_invariants, pin_root,
                                                                       {p: set() for p in cgs}, "pins removed"))

    def restored():
        try:
            check_complete(pin_root, policed, "restored")
            return True
        except (AssertionError, bpf.BackendError):
            return False
    wait_for("the watcher to load the unit again", restored)
    check_invariants(pin_root, policed, "restored")
    assert "removed or replaced behind the watcher" in d.log()
