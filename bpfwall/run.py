"""`bpfwall run`: start a command whose sockets are filtered from the first one.

A cgroup_skb program filters the sockets of the cgroup it is attached to, and
a socket belongs to the cgroup its creator was in. So the command must sit in
a filtered cgroup before it execs. Two ways, one result:

- systemd is PID 1 and systemd-run exists: pin the programs as the unit
  `run-bpfwall-<random>.scope` and run `systemd-run --scope
  -p IPIngressFilterPath=<pin> …`. systemd attaches the programs when it
  creates the scope's cgroup, before the command joins it. The scope's first
  process checks that they really are attached (systemd only warns when it
  cannot firewall, e.g. under a seccomp filter that blocks bpf()) and only then
  execs the command: fail closed.
- otherwise: make a cgroup of our own below the one we run in, attach the
  programs, and fork; the child joins the cgroup before exec.

The parent waits, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT, exits with the
command's status (128+N when a signal N ended it) and leaves nothing behind.
On the cgroup path it waits until everything the command started has exited:
the cgroup can only go when it is empty, and processes left in it must not
lose their filter. On the systemd path the pins go when the command exits;
processes still in the scope keep the attached programs until the scope ends.

A bpfwall killed on the way (SIGKILL, OOM) cannot clean up. So before it
creates anything it writes a record of what it will create (runrecord.py) and
marks its pins with the record's token; the next run, or `bpfwall gc`, removes
what a dead run left once its command has exited (leftovers.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

from . import backends, dropin, leftovers, runrecord, unitkey
from .backends import ProgramBackend
from .build import UnitProgram
from .crashpoint import reached
from .errors import Error
from .kernel import cgroup
from .backends.base import DIRECTIONS
from .sandbox import own_cgroup_path

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
WATCHED = {*FORWARDED, signal.SIGCHLD}
SI_KERNEL = 0x80  # si_code of a signal the kernel sent, e.g. ^C from the terminal
EXIT_NOT_FOUND, EXIT_CANNOT_RUN = 127, 126  # as env(1), timeout(1), shells


class RunError(Error):
    """The command could not be started with its filters; nothing was left behind."""


def scope_name(name: str | None) -> str:
    """The unit the command runs as: NAME(.scope), or run-bpfwall-<random>.scope."""
    if name is None:
        return f"run-bpfwall-{uuid.uuid4().hex[:12]}.scope"
    if name.endswith(".scope"):
        unit = name
    elif "." in name:
        raise RunError(f"--name {name}: the command runs as a scope; give NAME or NAME.scope")
    else:
        unit = f"{name}.scope"
    dropin.section(unit)  # a valid, policeable unit name
    return unit


def use_systemd() -> bool:
    return dropin.systemd_running() and shutil.which("systemd-run") is not None


def resolve_command(command: list[str]) -> str:
    if not command:
        raise RunError("run: give the command after --, e.g. bpfwall run --egress 'udp' -- CMD ARG…")
    path = shutil.which(command[0])
    if path is None:
        raise RunError(f"{command[0]}: command not found")
    return path


def run(command: list[str], program, params: dict | None = None, sets: dict | None = None,
        mode: str | None = None, *, name: str | None = None, backend: ProgramBackend | None = None,
        systemd: bool | None = None, log: dict | None = None) -> int:
    """Run `command` with `program` on its cgroup (pinned by `backend`, default: the bpf
    backend's default pin root); its exit status. `log`: the drop events' limit."""
    backend = backend or backends.create("bpf")
    pin_root = backend.pin_root
    unit = scope_name(name)
    resolve_command(command)
    systemd = use_systemd() if systemd is None else systemd
    if systemd:  # the pin paths go into the scope's transient unit file
        for d in DIRECTIONS:
            dropin.check_filter_path(backend.prog_path(unit, d), transient=True)
    # Signals wait until the child can take them, and cleanup is never cut short.
    with _signals_held():
        for outcome in leftovers.collect(pin_root):
            print(f"bpfwall: {outcome.line()}", file=sys.stderr)
        own = None if systemd else os.path.join(own_cgroup_path(), unit)
        record = runrecord.Record(unit, os.path.realpath(pin_root), own, os.getpid(), runrecord.new_token())
        held = runrecord.create(pin_root, unitkey.encode(unit), record)
        if os.path.isdir(backend.unit_dir(unit)):  # checked with the name reserved
            held.release(remove=True)
            raise RunError(f"{unit} is loaded already (pins at {backend.unit_dir(unit)}); "
                           "choose another --name")
        try:
            reached("run:recorded")
            backend.load(unit, _marked(program, record.token), params, sets, mode, log=log)
            reached("run:loaded")
            try:
                if systemd:
                    return _run_scope(command, backend, unit)
                return _run_in_cgroup(command, backend, unit, own)
            finally:
                _cleanup(backend, unit, own)
                reached("run:cleaned")
        finally:
            held.release(remove=not leftovers.left_behind(pin_root, record))


@dataclasses.dataclass(frozen=True)
class _RunProgram(UnitProgram):
    """The program with the run's token in its meta: the pins tell they are this run's."""
    run_token: str = ""

    def meta(self) -> dict:
        return {**super().meta(), "run": self.run_token}


def _marked(program: UnitProgram, token: str) -> UnitProgram:
    fields = {f.name: getattr(program, f.name) for f in dataclasses.fields(UnitProgram)}
    return _RunProgram(**fields, run_token=token)


# -- the systemd way ------------------------------------------------------------

def _run_scope(command: list[str], backend: ProgramBackend, unit: str) -> int:
    expected = backend.program_ids(unit)
    argv = ["systemd-run", "--scope", "--quiet", f"--unit={unit}"]
    argv += [f"-p{dropin.SETTINGS[d]}={backend.prog_path(unit, d)}" for d in expected]
    argv += ["--", *_verify_argv(unit, expected), *command]
    return _supervise(argv, None)


def _verify_argv(unit: str, expected: dict[str, int]) -> list[str]:
    """The scope's first process: this Python, checking its cgroup, then exec'ing the command."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from bpfwall.run import verify_and_exec; verify_and_exec(sys.argv[2:])")
    return [sys.executable, "-I", "-c", code, package_parent, unit, json.dumps(expected), "--"]


def verify_and_exec(args: list[str]) -> None:
    """[unit, {direction: program id}, '--', CMD…]: exec CMD if our cgroup runs those programs."""
    unit, expected, command = args[0], json.loads(args[1]), args[3:]
    here = own_cgroup_path()
    missing = [d for d, prog_id in expected.items() if prog_id not in cgroup.query(here, d)[1]]
    if missing:
        print(f"bpfwall: error: systemd did not attach the {' and '.join(missing)} filter of {unit} to "
              f"{here} (is BPF firewalling supported? see `journalctl -b | grep -i bpf`); "
              "the command was not started", file=sys.stderr)
        sys.exit(EXIT_CANNOT_RUN)
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"bpfwall: error: {command[0]}: {e.strerror}", file=sys.stderr)
        sys.exit(EXIT_NOT_FOUND if isinstance(e, FileNotFoundError) else EXIT_CANNOT_RUN)


def _cleanup(backend: ProgramBackend, unit: str, own: str | None) -> None:
    """Remove the unit's pins. On the systemd path the programs stay where systemd attached
    them: processes the command left in the scope keep their filter until the scope ends
    and the kernel frees the programs. Our own cgroup is gone by now: detach and unload.
    If it is not (something keeps it busy), its filters stay and `bpfwall gc` removes them
    once it is empty."""
    path = backend.unit_dir(unit)
    if own is not None and os.path.lexists(own):
        print(f"bpfwall: warning: {own} is still there; the filters of {unit} stay on it "
              "(`bpfwall gc` removes them once it is empty)", file=sys.stderr)
        return
    try:
        leftovers.remove_pins(backend.pin_root, unit, detach=own is not None)
    except (OSError, Error) as e:
        print(f"bpfwall: warning: cannot remove the pins of {unit} at {path}: {e} "
              "(`bpfwall gc` tries again)", file=sys.stderr)


# -- a cgroup of our own ----------------------------------------------------------

def _run_in_cgroup(command: list[str], backend: ProgramBackend, unit: str, path: str) -> int:
    try:
        os.mkdir(path)
    except OSError as e:
        raise RunError(f"cannot create cgroup {path}: {e.strerror}") from None
    try:
        reached("run:cgroup")
        backend.attach(unit, path)
        reached("run:attached")
        status = _supervise(command, path)
        _wait_empty(path)
        reached("run:exited")
        return status
    finally:
        _remove_cgroup(path)
        reached("run:cgroup-removed")


def _join(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write("0")


def _wait_empty(path: str) -> None:
    """Wait for what the command left running; forward signals to all of it."""
    while leftovers.populated(path):
        info = signal.sigtimedwait(WATCHED, 0.2)
        if info is not None and info.si_signo != signal.SIGCHLD:
            for pid in leftovers.procs(path):
                _kill(pid, info.si_signo)


def _remove_cgroup(path: str) -> None:
    # A failed start can leave our forked child behind for a moment: wait for the kernel.
    deadline = time.monotonic() + 5
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise RunError(f"cannot remove cgroup {path}: {e.strerror}") from None
            time.sleep(0.02)


# -- supervising the child --------------------------------------------------------

def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def _signals_held():
    """Block the forwarded signals and SIGCHLD (we take them with sigwaitinfo); on the way
    out, drop the ones still pending: they were meant for a child that is gone."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    try:
        yield
    finally:
        while pending := signal.sigpending() & WATCHED:
            signal.sigtimedwait(pending, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _supervise(argv: list[str], cgroup_path: str | None) -> int:
    """Start argv (joining cgroup_path first, if given), forward signals, return its status."""
    early = signal.sigpending() & set(FORWARDED)
    if early:  # interrupted while loading: do not start the command at all
        sig = min(early)
        signal.sigtimedwait({sig}, 0)
        return 128 + sig
    child_mask = signal.pthread_sigmask(signal.SIG_BLOCK, ()) - WATCHED

    def in_child():
        signal.pthread_sigmask(signal.SIG_SETMASK, child_mask)
        if cgroup_path is not None:
            _join(cgroup_path)

    try:
        child = subprocess.Popen(argv, preexec_fn=in_child)
    except OSError as e:
        raise RunError(f"{argv[0]}: {e.strerror}") from None
    reached("run:started")
    try:
        while child.poll() is None:
            info = signal.sigwaitinfo(WATCHED)
            if info.si_signo == signal.SIGCHLD:
                continue
            # ^C at the terminal reaches the whole foreground group, the child too.
            if info.si_code == SI_KERNEL and _same_group(child.pid):
                continue
            _kill(child.pid, info.si_signo)
    except BaseException:
        _kill(child.pid, signal.SIGKILL)
        child.wait()
        raise
    code = child.returncode
    return 128 - code if code < 0 else code


def _same_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == os.getpgrp()
    except ProcessLookupError:
        return False
