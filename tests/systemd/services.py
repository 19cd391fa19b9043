"""Test services for the container: a UDP receiver that counts, a sender, unit texts.

The receiver is a Type=notify service: `systemctl start` returns once its
sockets are bound. It keeps per-port counts in a JSON file under
/var/lib/bpfwall-test/, which the host reads through the container's overlay,
and records which ingress programs its cgroup held when its first process ran
(queried with bpfwall's own kernel layer from the read-only repository).
"""
from __future__ import annotations

import json
import time
import uuid

from tests.systemd.container import REPO_MOUNT, Container

STATE_DIR = "/var/lib/bpfwall-test"
COUNTER = "/usr/local/lib/bpfwall-test/udp_counter.py"
COUNTER_SOURCE = """\
import json, os, selectors, socket, sys
from systemd import daemon
from bpfwall.kernel import cgroup

state, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
with open("/proc/self/cgroup") as f:
    own = next(line[3:].strip() for line in f if line.startswith("0::"))
# Before anything else runs: which ingress programs did systemd attach already?
at_start = cgroup.query(cgroup.resolve(own), "ingress")[1]
counts = {str(p): 0 for p in ports}

def save():
    tmp = state + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "cgroup": own, "ingress_at_start": at_start, "counts": counts}, f)
    os.replace(tmp, state)

sel = selectors.DefaultSelector()
for port in ports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind(("127.0.0.1", port))
    sel.register(s, selectors.EVENT_READ, str(port))
save()
daemon.notify("READY=1")
while True:
    for key, _ in sel.select():
        key.fileobj.recv(65536)
        counts[key.data] += 1
        save()
"""
SENDER = """\
import socket, sys
# A cgroup egress filter that drops a datagram makes sendto() fail with EPERM.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for arg in sys.argv[1:]:
    port, n = map(int, arg.split("x"))
    sent = refused = 0
    for i in range(n):
        try:
            s.sendto(b"bpfwall-test %d" % i, ("127.0.0.1", port))
            sent += 1
        except PermissionError:
            refused += 1
    print(f"port {port}: sent {sent}, refused {refused}")
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
        "[Unit]", f"Description=bpfwall test receiver {name}", *after, "",
        "[Service]", "Type=notify", f"Environment=PYTHONPATH={REPO_MOUNT} PYTHONDONTWRITEBYTECODE=1",
        "StateDirectory=bpfwall-test",
        f"ExecStart=/usr/bin/python3 {COUNTER} {STATE_DIR}/{name}.json {' '.join(map(str, ports))}",
        *service, ""])


def loader_unit(unit: str, ingress: str | None = None, egress: str | None = None) -> str:
    """A one-shot unit that loads `unit`'s filters before it starts and unloads them after it stops."""
    args = "".join(f' --{d} "{e}"' for d, e in (("ingress", ingress), ("egress", egress)) if e)
    return "\n".join([
        "[Unit]", f"Description=bpfwall filters of {unit}", f"Before={unit}", "",
        "[Service]", "Type=oneshot", "RemainAfterExit=yes",
        f"ExecStart=/usr/local/bin/bpfwall load {unit}{args}",
        f"ExecStop=/usr/local/bin/bpfwall unload {unit}", ""])


def install_unit(c: Container, name: str, text: str) -> None:
    c.write(f"/etc/systemd/system/{name}", text)
    c.systemctl("daemon-reload", check=True)


def send_udp(c: Container, counts: dict[int, int]) -> None:
    """Send counts[port] datagrams to each 127.0.0.1:port inside the container (sender in no unit)."""
    c.exec(["python3", "-c", SENDER, *(f"{p}x{n}" for p, n in counts.items())], check=True)


def receiver_state(c: Container, name: str) -> dict:
    return json.loads(c.path(f"{STATE_DIR}/{name}.json").read_text())


def wait_counts(c: Container, name: str, expected: dict[int, int], settle: float = 0.3,
                timeout: float = 10) -> dict[int, int]:
    """The receiver's counts once they reach `expected` (or the deadline), after a quiet `settle`
    period in which late datagrams could still show up."""
    deadline = time.monotonic() + timeout
    while True:
        got = {int(p): n for p, n in receiver_state(c, name)["counts"].items()}
        if all(got.get(p, 0) >= n for p, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(settle)
    return {int(p): n for p, n in receiver_state(c, name)["counts"].items()}


def bpfwall_stats(c: Container, unit: str) -> dict:
    return json.loads(c.bpfwall("stats", unit, "--json", check=True).stdout)


def packets(stats: dict, direction: str, verdict: str) -> int:
    return stats["counters"][direction][verdict]["packets"]
