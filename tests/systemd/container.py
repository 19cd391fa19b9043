"""A real systemd to test against: systemd-nspawn boots a cached Debian tree.

One Container is one boot. Everything it makes on the host is its own and
uniquely named (`bpfwall-test-nspawn-<hex>`), and stop() removes all of it, also
after a failed or half-done start:

    <work root>/<name>/            upper/ work/ of an overlay over the cached
                                   tree, merged/ (the container's /), nspawn.log
    <cgroup2>/<name>/              nspawn's cgroup; it creates supervisor/ and
                                   payload/ (the container's cgroup root) in it
    /sys/fs/bpf/<name>/            bind-mounted as the container's /sys/fs/bpf,
                                   so bpfwall's default pin root inside and
                                   every IP*FilterPath= pin live under it
    /run/systemd/nspawn/locks/…    nspawn's lock for the image, which it
                                   leaves behind when it is killed

An own overlay rather than --volatile=overlay (which also works here): its
upper layer is visible from the host, so files and units are put in place
before boot and the container's journal can be read from outside.

Facts this relies on (this host has no systemd and hybrid cgroups):
- SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 gives the container cgroup2 only;
  --register=no --keep-unit keep nspawn from asking a host systemd for a scope.
- nspawn's seccomp filter blocks bpf(2) unless --system-call-filter=bpf; without
  it systemd inside reports no BPF firewall and ignores IP*FilterPath=.
- nspawn's default capability set lacks CAP_BPF and CAP_PERFMON, which
  bpfwall.service keeps (and needs: without CAP_SYS_ADMIN, bpf(2) wants them).
- The container's PID 1 is a direct child of nspawn; signals reach it through a
  pidfd, so a recycled PID is never hit. SIGRTMIN+4 asks it to power off.
- Files are written through the overlay's merged directory on the host, so units
  can be put in place before boot; /run and /tmp inside are tmpfs and not seen.

A run killed before stop() leaves its state file behind; the next start()
tears down such leftovers of runs whose owner process is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from bpfwall.kernel.cgroup import cgroup2_mount

REPO = Path(__file__).resolve().parents[2]  # the repository under test …
REPO_MOUNT = "/opt/bpfwall"                  # … and where the container sees it
WORK_ROOT = Path("/var/tmp/bpfwall-test-containers")
BPFFS = "/sys/fs/bpf"
NSPAWN_LOCKS = "/run/systemd/nspawn/locks"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Commands inside see this environment, not the test runner's.
INSIDE_ENV = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}
# `bpfwall` inside runs the repository under test, bind-mounted read-only.
# -P keeps the working directory off sys.path; bytecode cannot be written there.
WRAPPER = f"""#!/bin/sh
# Written by the bpfwall test harness: the repository under test, read-only at {REPO_MOUNT}.
export PYTHONPATH={REPO_MOUNT} PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -P -m bpfwall "$@"
"""
REQUIRED_TOOLS = ("systemd-nspawn", "nsenter", "timeout", "mount", "umount")


class ContainerError(Exception):
    """The container could not be started, reached, or cleaned up; the message says what happened."""


class ExecError(ContainerError):
    def __init__(self, args, proc: subprocess.CompletedProcess):
        self.proc = proc
        super().__init__(f"`{shlex.join(args)}` exited {proc.returncode}\n"
                         f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")


def missing_tools() -> list[str]:
    return [t for t in REQUIRED_TOOLS if not shutil.which(t)]


def _start_time(pid: int) -> str | None:
    """A process's start time (field 22 of /proc/PID/stat): tells a PID from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Container:
    """One booted systemd in a container; use as a context manager or call start()/stop()."""

    def __init__(self, rootfs: Path, repo: Path | None, boot_timeout: float = 60, before_boot=None):
        """`before_boot(container)` puts files in place (write(), path()) before systemd starts,
        e.g. units enabled at boot. repo=None: the repository is not visible inside (no
        /opt/bpfwall, no /usr/local/bin/bpfwall), for tests of the installed package."""
        self.before_boot = before_boot
        self.rootfs = Path(rootfs)
        self.repo = Path(repo).resolve() if repo is not None else None
        self.boot_timeout = boot_timeout
        self.name = f"bpfwall-test-nspawn-{uuid.uuid4().hex[:10]}"
        self.workdir = WORK_ROOT / self.name
        self.merged = self.workdir / "merged"
        self.log_path = self.workdir / "nspawn.log"
        self.host_cgroup = os.path.join(cgroup2_mount(), self.name)
        self.bpffs_dir = os.path.join(BPFFS, self.name)
        self.nspawn: subprocess.Popen | None = None
        self.leader = 0          # host PID of the container's PID 1
        self._leader_fd = -1     # pidfd of it
        self.boot_seconds = 0.0  # nspawn start → is-system-running answered
        self.system_state = ""   # running or degraded
        self._mounted = False
        self.nspawn_lock = ""    # nspawn's lock file for the image; left behind when nspawn is killed

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> "Container":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        missing = missing_tools()
        if missing:
            raise ContainerError(f"missing {', '.join(missing)}: run `make setup` (apt-get install systemd-container util-linux)")
        reap_stale()
        try:
            self._prepare()
            started = time.monotonic()
            self._launch()
            self._wait_running(started + self.boot_timeout)
            self.boot_seconds = time.monotonic() - started
        except BaseException as e:
            log = self.log_tail()
            try:
                self.stop()
            except ContainerError as stop_error:
                e.add_note(str(stop_error))
            if log:
                e.add_note(f"last console lines of {self.name}:\n{log}")
            raise

    def _prepare(self) -> None:
        for sub in ("upper", "work", "merged"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self._save_state()
        opts = f"lowerdir={self.rootfs},upperdir={self.workdir / 'upper'},workdir={self.workdir / 'work'}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)])
        self._mounted = True
        st = os.stat(self.merged)
        self.nspawn_lock = f"{NSPAWN_LOCKS}/inode-{st.st_dev}:{st.st_ino}"
        if self.repo is not None:
            self.write("/usr/local/bin/bpfwall", WRAPPER, mode=0o755)
        os.mkdir(self.host_cgroup)
        if not os.path.ismount(BPFFS):
            _run(["mount", "-t", "bpf", "bpf", BPFFS])
        os.mkdir(self.bpffs_dir, 0o700)
        if self.before_boot is not None:
            self.before_boot(self)

    def _launch(self) -> None:
        cmd = ["systemd-nspawn", "--quiet", "-D", str(self.merged), "--boot", f"--machine={self.name}",
               "--register=no", "--keep-unit", "--private-network", "--system-call-filter=bpf",
               "--capability=CAP_BPF,CAP_PERFMON",
               "--console=read-only",
               f"--bind={self.bpffs_dir}:{BPFFS}"]
        if self.repo is not None:
            cmd.append(f"--bind-ro={self.repo}:{REPO_MOUNT}")
        env = {"PATH": PATH, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        procs = os.path.join(self.host_cgroup, "cgroup.procs")

        def enter_cgroup():  # in the child, before exec: nspawn --keep-unit uses the cgroup it runs in
            with open(procs, "w") as f:
                f.write("0")

        with open(self.log_path, "wb") as log:
            self.nspawn = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           preexec_fn=enter_cgroup, start_new_session=True)
        self._save_state()
        self.leader = self._find_leader()
        self._leader_fd = os.pidfd_open(self.leader)
        self._save_state()

    def _find_leader(self) -> int:
        """The child of nspawn that is PID 1 of its own PID namespace."""
        deadline = time.monotonic() + self.boot_timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.nspawn.returncode}")
            for entry in os.listdir("/proc"):
                if entry.isdigit() and _is_init_child_of(int(entry), self.nspawn.pid):
                    return int(entry)
            time.sleep(0.02)
        raise ContainerError("the container's PID 1 did not appear")

    def _wait_running(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ContainerError(f"systemd did not finish booting in {self.boot_timeout:.0f} s")
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.nspawn.returncode} while booting")
            # Fails at once until PID 1 listens on its private socket; then waits for the boot.
            proc = self.exec(["systemctl", "is-system-running", "--wait"], timeout=max(1, int(left)))
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                self.system_state = state
                return
            if state in ("maintenance", "stopping"):  # "offline": PID 1 not reachable yet
                raise ContainerError(f"systemd is {state}: {proc.stderr.strip()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> None:
        """Power off, then remove everything this container made. Safe to call twice."""
        try:
            self._stop_processes(timeout)
        except Exception as e:
            # Its files are still in use: removing them now would pull the floor from under it.
            raise ContainerError(f"teardown of {self.name} stopped: its processes did not end ({e}); "
                                 f"left in place: {self.workdir}, {self.host_cgroup}, {self.bpffs_dir}") from e
        errors = []
        for step in (self._remove_cgroups, self._unmount, self._remove_bpffs_dir, self._remove_workdir,
                     self._remove_nspawn_lock):
            try:
                step()
            except Exception as e:  # every step runs, whatever failed before
                errors.append(f"{step.__name__}: {e}")
        if errors:
            raise ContainerError(f"teardown of {self.name} incomplete: " + "; ".join(errors))

    def _stop_processes(self, timeout: float) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self._leader_fd >= 0:
                _pidfd_signal(self._leader_fd, signal.SIGRTMIN + 4)  # systemd: poweroff
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                if self._leader_fd >= 0:  # killing PID 1 of the namespace kills all inside it
                    _pidfd_signal(self._leader_fd, signal.SIGKILL)
                try:
                    self.nspawn.wait(5)
                except subprocess.TimeoutExpired:
                    self.nspawn.kill()
                    self.nspawn.wait(5)
        if self._leader_fd >= 0:
            os.close(self._leader_fd)
            self._leader_fd = -1
        _kill_cgroup_members(self.host_cgroup, timeout=5)

    def _remove_cgroups(self) -> None:
        _remove_cgroup_tree(self.host_cgroup)

    def _unmount(self) -> None:
        if self._mounted or os.path.ismount(self.merged):
            if subprocess.run(["umount", str(self.merged)], capture_output=True).returncode != 0:
                _run(["umount", "-l", str(self.merged)])
            self._mounted = False

    def _remove_bpffs_dir(self) -> None:
        if os.path.isdir(self.bpffs_dir):
            shutil.rmtree(self.bpffs_dir)

    def _remove_workdir(self) -> None:
        if os.path.ismount(self.merged):
            raise ContainerError(f"{self.merged} is still mounted; not removing {self.workdir}")
        if self.workdir.exists():
            shutil.rmtree(self.workdir)

    def _remove_nspawn_lock(self) -> None:
        if self.nspawn_lock:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.nspawn_lock)

    def _save_state(self) -> None:
        state = {"owner": os.getpid(), "owner_start": _start_time(os.getpid()),
                 "nspawn": self.nspawn.pid if self.nspawn else 0,
                 "nspawn_start": _start_time(self.nspawn.pid) if self.nspawn else None,
                 "leader": self.leader, "leader_start": _start_time(self.leader) if self.leader else None,
                 "cgroup": self.host_cgroup, "bpffs": self.bpffs_dir, "merged": str(self.merged),
                 "nspawn_lock": self.nspawn_lock}
        (self.workdir / "state.json").write_text(json.dumps(state))

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- running things inside ---------------------------------------------------

    def _nsenter(self, args: list[str], timeout: float) -> list[str]:
        if not self.leader:
            raise ContainerError("the container is not running")
        # timeout(1) signals its whole process group, so nsenter's forked child dies with it.
        return ["timeout", "-k", "3", str(int(timeout)), "nsenter", "-t", str(self.leader), "-a", "--", *args]

    def exec(self, args: list[str], timeout: float = 60, input: str | None = None, check: bool = False,
             env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a command in all of the container's namespaces (as root, in no unit)."""
        cmd = self._nsenter(args, timeout)
        try:
            proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                                  env={**INSIDE_ENV, **(env or {})}, timeout=timeout + 10)
        except subprocess.TimeoutExpired as e:
            raise ContainerError(f"`{shlex.join(args)}` did not end in {timeout + 10:.0f} s") from e
        if check and proc.returncode != 0:
            raise ExecError(args, proc)
        return proc

    def popen(self, args: list[str], timeout: float = 60) -> subprocess.Popen:
        """Start a command inside and return at once (stdout/stderr piped, text); it is killed
        after `timeout` seconds at the latest."""
        return subprocess.Popen(self._nsenter(args, timeout), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, env=INSIDE_ENV)

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.exec(["sh", "-c", script], **kw)

    def systemctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """systemctl inside; a failed start/restart/reload with check=True carries the units' journal."""
        try:
            return self.exec(["systemctl", "--no-pager", *args], **kw)
        except ExecError as e:
            if args and args[0] in ("start", "restart", "reload", "reload-or-restart"):
                for unit in args[1:]:
                    if not unit.startswith("-"):
                        e.add_note(f"--- journal of {unit}\n" + self.exec(
                            ["journalctl", "--no-pager", "-n", "20", "-o", "cat", "-u", unit]).stdout)
            raise

    def systemd_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.exec(["systemd-run", "--quiet", *args], **kw)

    def user_systemctl(self, user: str, *args: str, **kw) -> subprocess.CompletedProcess:
        """systemctl --user of USER's manager (`-M USER@` needs systemd-machined, which nspawn
        --register=no does not give): as the user, on the manager's private socket."""
        uid = self.exec(["id", "-u", user], check=True).stdout.strip()
        return self.exec(["runuser", "-u", user, "--", "env", f"XDG_RUNTIME_DIR=/run/user/{uid}",
                          "systemctl", "--user", "--no-pager", *args], **kw)

    def bpfwall(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.exec(["bpfwall", *args], **kw)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props), check=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *extra: str) -> str:
        """The journal (message text only) of one unit, or all of it."""
        args = ["journalctl", "--no-pager", "--quiet", "-o", "cat", *extra]
        if unit:
            args += ["--unit", unit]
        return self.exec(args, check=True).stdout

    # -- files and cgroups, seen from the host -------------------------------------

    def path(self, inside: str) -> Path:
        """The host path of a file in the container (through the overlay; not /run or /tmp)."""
        return self.merged / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".bpfwall-test-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    def remove(self, inside: str) -> None:
        self.path(inside).unlink(missing_ok=True)

    @property
    def payload_cgroup(self) -> str:
        """The container's cgroup root on the host."""
        return os.path.join(self.host_cgroup, "payload")

    def unit_cgroup(self, unit: str, user: str | None = None) -> str:
        """Host path of a unit's cgroup (of a user manager's unit with user=NAME)."""
        if user is None:
            rel = self.show(unit, "ControlGroup")["ControlGroup"]
        else:
            rel = self.user_systemctl(user, "show", unit, "--property=ControlGroup", "--value",
                                      check=True).stdout.strip()
        if not rel:
            raise ContainerError(f"{unit} has no cgroup (not running?)")
        return os.path.join(self.payload_cgroup, rel.lstrip("/"))


# -- helpers --------------------------------------------------------------------

def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ContainerError(f"`{shlex.join(cmd)}` failed: {proc.stderr.strip()}")


def _is_init_child_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return False
    nspid = fields.get("NSpid", "").split()
    return fields.get("PPid", "").strip() == str(parent) and len(nspid) >= 2 and nspid[-1] == "1"


def _pidfd_signal(fd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass


def _members(root: str) -> list[int]:
    pids = []
    for dirpath, _, files in os.walk(root):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids += [int(p) for p in f.read().split()]
            except OSError:
                pass
    return pids


def _kill_cgroup_members(root: str, timeout: float) -> None:
    """SIGKILL, by PID, whatever is still in our cgroup tree (the container's processes)."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(root) and (pids := _members(root)):
        if time.monotonic() > deadline:
            raise ContainerError(f"processes {pids} stay in {root}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove_cgroup_tree(root: str, timeout: float = 5) -> None:
    """rmdir bottom-up; a cgroup whose last process just died may be busy for a moment."""
    deadline = time.monotonic() + timeout
    while os.path.isdir(root):
        try:
            for dirpath, _, _ in os.walk(root, topdown=False):
                os.rmdir(dirpath)
        except OSError as e:
            if time.monotonic() > deadline:
                raise ContainerError(f"cannot remove cgroup {root}: {e}") from None
            time.sleep(0.05)


def reap_stale() -> list[str]:
    """Tear down containers of test runs that died before their stop(); returns their names."""
    reaped = []
    if not WORK_ROOT.is_dir():
        return reaped
    for statefile in WORK_ROOT.glob("*/state.json"):
        try:
            state = json.loads(statefile.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(state["owner"]) == state["owner_start"]:
            continue  # its owner still runs: not ours to touch
        stale = Container.__new__(Container)
        stale.__dict__.update(
            name=statefile.parent.name, workdir=statefile.parent, merged=Path(state["merged"]),
            host_cgroup=state["cgroup"], bpffs_dir=state["bpffs"], nspawn=None, leader=0,
            _leader_fd=-1, _mounted=False, log_path=statefile.parent / "nspawn.log",
            nspawn_lock=state.get("nspawn_lock", ""))
        for pid_key in ("leader", "nspawn"):  # the same processes, not PIDs since reused
            pid = state[pid_key]
            if pid and _start_time(pid) == state[f"{pid_key}_start"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            _kill_cgroup_members(stale.host_cgroup, timeout=5)
            stale.stop()
            reaped.append(stale.name)
        except ContainerError:
            pass
    return reaped
