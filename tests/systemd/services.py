"""Test services for the container: a UDP receiver that counts, a sender, unit texts.

The receiver is a Type=notify service: `systemctl start` returns once its
sockets are bound. It keeps per-port counts in a JSON file under
/var/lib/bpfwall-test/, which the host reads through the container's overlay,
and records which ingress programs its cgroup held when its first process ran
(queried with bpfwall's own kernel layer from the read-only repository).
"""
from __future__ import annotations

import json
import os
import time
import uuid

from bpfwall.kernel import cgroup, pins, progs
from bpfwall.kernel.errors import KernelError
from tests.systemd.container import REPO_MOUNT, Container

STATE_DIR = "/var/lib/bpfwall-test"
COUNTER = "/usr/local/lib/bpfwall-test/udp_counter.py"
COUNTER_SOURCE = """\
import json, os, selectors, socket, sys, time
from systemd import daemon
from bpfwall.kernel import cgroup

state, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
with open("/proc/self/cgroup") as f:
    own = next(line[3:].strip() for line in f if line.startswith("0::"))
# Before anything else runs: which ingress programs did systemd attach already?
try:
    at_start = cgroup.query(cgroup.resolve(own), "ingress")[1]
except Exception:  # an unprivileged (user) service may not query
    at_start = None
seqs = {str(p): [] for p in ports}  # payload "bpfwall-test SEQ": SEQ of each datagram, in arrival order

def save():
    tmp = state + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "cgroup": own, "ingress_at_start": at_start,
                   "counts": {p: len(v) for p, v in seqs.items()}, "seqs": seqs}, f)
    os.replace(tmp, state)

sel = selectors.DefaultSelector()
for port in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_READ, str(port))
save()
daemon.notify("READY=1")
dirty, last = False, time.monotonic()
while True:
    ready = sel.select(timeout=0.02)
    for key, _ in ready:
        data = key.fileobj.recv(65536)
        seqs[key.data].append(int(data.split()[-1]))
        dirty = True
    # Save when quiet, and at least every 0.2 s under load (saving per datagram would slow it down).
    if dirty and (not ready or time.monotonic() - last > 0.2):
        save()
        dirty, last = False, time.monotonic()
"""
SENDER = """\
import json, socket, sys, time
# Arguments: PORTxCOUNT… (COUNT datagrams to each port in turn), or
# --steady SECONDS INTERVAL PORT… (one datagram every INTERVAL s, cycling through the ports).
# Payloads carry one sequence number across all ports. A cgroup egress filter that
# drops a datagram makes sendto() fail with EPERM.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
seq = 0
sent, refused = {}, {}

def send(port):
    global seq
    try:
        s.sendto(b"bpfwall-test %d" % seq, ("127.0.0.1", port))
        sent.setdefault(port, []).append(seq)
    except PermissionError:
        refused.setdefault(port, []).append(seq)
    seq += 1

if sys.argv[1] == "--steady":
    seconds, interval, ports = float(sys.argv[2]), float(sys.argv[3]), [int(p) for p in sys.argv[4:]]
    # Loopback queues each datagram on the sending CPU's backlog and the ingress filter judges it
    # from there: on one CPU, datagrams are judged in the order they were sent, so "which filter
    # judged it" follows the sequence numbers even when softirq work is deferred under load.
    import os
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        send(ports[seq % len(ports)])
        time.sleep(interval)
else:
    for arg in sys.argv[1:]:
        port, n = map(int, arg.split("x"))
        for _ in range(n):
            send(port)
for port in sorted(set(sent) | set(refused)):
    print(f"port {port}: sent {len(sent.get(port, []))}, refused {len(refused.get(port, []))}")
print("RESULT " + json.dumps({"sent": sent, "refused": refused}))
"""


def unique(prefix: str, suffix: str = "service") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}.{suffix}"


def install_counter(c: Container) -> None:
    c.write(COUNTER, COUNTER_SOURCE)


def receiver_unit(name: str, ports: list[int], loader: str | None = None, service: tuple[str, ...] = ()) -> str:
    """A counting receiver; `loader` is a unit it requires and starts after; `service` adds
    [Service] lines (e.g. IPIngressFilterPath=)."""
    after = [f"Requires={loader}", f"After={loader}"] if loader else []
    return "\n".join([
        # StartLimitIntervalSec=0: the tests restart it 50 times in a row
        "[Unit]", f"Description=bpfwall test receiver {name}", "StartLimitIntervalSec=0", *after, "",
        "[Service]", "Type=notify", f"Environment=PYTHONPATH={REPO_MOUNT} PYTHONDONTWRITEBYTECODE=1",
        "StateDirectory=bpfwall-test",
        # %S: /var/lib for the system manager, ~/.local/state for a user's
        f"ExecStart=/usr/bin/python3 {COUNTER} %S/bpfwall-test/{name}.json {' '.join(map(str, ports))}",
        *service, ""])


def loader_unit(unit: str, ingress: str | None = None, egress: str | None = None) -> str:
    """A one-shot unit that loads `unit`'s filters before it starts and unloads them after it stops."""
    args = "".join(f' --{d} "{e}"' for d, e in (("ingress", ingress), ("egress", egress)) if e)
    return "\n".join([
        "[Unit]", f"Description=bpfwall filters of {unit}", f"Before={unit}", "",
        "[Service]", "Type=oneshot", "RemainAfterExit=yes",
        f"ExecStart=/usr/local/bin/bpfwall load {unit}{args}",
        f"ExecStop=/usr/local/bin/bpfwall unload {unit}", ""])


def wait_until(condition, message: str, timeout: float = 10):
    """condition()'s first true value, polled every 10 ms; AssertionError(message) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)
    return value


def install_unit(c: Container, name: str, text: str) -> None:
    c.write(f"/etc/systemd/system/{name}", text)
    c.systemctl("daemon-reload", check=True)


def send_udp(c: Container, counts: dict[int, int]) -> dict:
    """Send counts[port] datagrams to each 127.0.0.1:port inside the container (sender in no unit);
    returns {"sent": {port: [seq…]}, "refused": {port: [seq…]}}."""
    out = c.exec(["python3", "-c", SENDER, *(f"{p}x{n}" for p, n in counts.items())], check=True).stdout
    return sender_result(out)


def sender_result(output: str) -> dict:
    line = next(l for l in output.splitlines() if l.startswith("RESULT "))
    raw = json.loads(line[len("RESULT "):])
    return {k: {int(p): v for p, v in d.items()} for k, d in raw.items()}


def receiver_state(c: Container, name: str, state_dir: str = STATE_DIR) -> dict:
    """What the receiver wrote; state_dir is ~/.local/state/bpfwall-test for a user's receiver."""
    return json.loads(c.path(f"{state_dir}/{name}.json").read_text())


def wait_counts(c: Container, name: str, expected: dict[int, int], settle: float = 0.3,
                timeout: float = 10, state_dir: str = STATE_DIR) -> dict[int, int]:
    """The receiver's counts once they reach `expected` (or the deadline), after a quiet `settle`
    period in which late datagrams could still show up."""
    deadline = time.monotonic() + timeout
    while True:
        got = {int(p): n for p, n in receiver_state(c, name, state_dir)["counts"].items()}
        if all(got.get(p, 0) >= n for p, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(settle)
    return {int(p): n for p, n in receiver_state(c, name, state_dir)["counts"].items()}


def bpfwall_stats(c: Container, unit: str) -> dict:
    return json.loads(c.bpfwall("stats", unit, "--json", check=True).stdout)


def packets(stats: dict, direction: str, verdict: str) -> int:
    return stats["counters"][direction][verdict]["packets"]


# -- programs and cgroups, seen from the host -----------------------------------

def pin_path(c: Container, unit: str, direction: str = "ingress") -> str:
    """Where bpfwall inside pins `unit`'s program (asked, never computed)."""
    return c.bpfwall("path", unit, direction, check=True).stdout.strip()


def host_pin(c: Container, pin: str) -> str:
    """The host path of a pin the container sees under /sys/fs/bpf."""
    return os.path.join(c.bpffs_dir, os.path.relpath(pin, "/sys/fs/bpf"))


def pinned_prog_id(c: Container, pin: str) -> int:
    """The id of the program pinned at `pin` inside the container, read from the host."""
    fd = pins.get(host_pin(c, pin))
    try:
        return progs.prog_info(fd).id
    finally:
        os.close(fd)


def attached(host_cgroup: str, direction: str = "ingress") -> list[int]:
    """Program ids attached to a cgroup ([] if it does not exist)."""
    try:
        return cgroup.query(host_cgroup, direction)[1]
    except KernelError:
        return []


def wait_attached(host_cgroup: str, prog_id: int, timeout: float = 5, direction: str = "ingress") -> float:
    """Seconds until `prog_id` is attached to the cgroup, 0.0 if it is at the first look;
    it must be attached exactly once."""
    start = time.monotonic()
    first = True
    while True:
        ids = attached(host_cgroup, direction)
        if prog_id in ids:
            assert ids.count(prog_id) == 1, f"program {prog_id} attached {ids.count(prog_id)} times to {host_cgroup}"
            return 0.0 if first else time.monotonic() - start
        first = False
        if time.monotonic() - start > timeout:
            raise AssertionError(f"program {prog_id} not attached to {host_cgroup} within {timeout} s (attached: {ids})")
        time.sleep(0.002)
