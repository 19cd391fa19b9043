#!/usr/bin/env python3
"""`make demo`: a real cgroup, a real filter, real packets passing and dropping.

Everything runs through the `bpfwall` command as a user would type it; the
demo uses its own pin root and cgroup and removes both at the end.
"""
from __future__ import annotations

import os
import shlex
import socket
import struct
import subprocess
import sys
import time
import uuid

from bpfwall.sandbox import TempCgroup

BPFWALL = os.path.join(os.path.dirname(sys.executable), "bpfwall")
TAG = uuid.uuid4().hex[:8]
ENV = dict(os.environ, BPFWALL_PIN_ROOT=f"/sys/fs/bpf/bpfwall-demo-{TAG}")
UNIT = "demo.service"


def sh(*args: str, check: bool = True) -> str:
    print(f"\n$ bpfwall {' '.join(shlex.quote(a) for a in args)}")
    proc = subprocess.run([BPFWALL, *args], env=ENV, capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        print(out)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: bpfwall {args[0]} failed (exit {proc.returncode})")
    return out


def udp_packet(dport: int, payload: bytes = b"") -> str:
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                     socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
    return (ip + udp).hex()


def send_udp(port: int, count: int = 5) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            s.sendto(f"hello {i}".encode(), ("127.0.0.1", port))


def drain(sock: socket.socket) -> int:
    sock.settimeout(0.3)
    n = 0
    try:
        while True:
            sock.recv(100)
            n += 1
    except (TimeoutError, socket.timeout):
        return n


def tcp_connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def main() -> None:
    print("bpfwall demo: a cgroup with a filter, real packets on loopback.")
    sh("check", "icmp||(udp&&dst_port==53)||tcp and local_port in {80,443}")
    print("\n# Any packet can be tried in the kernel first (BPF_PROG_TEST_RUN): UDP to 53 with 0 and 4 payload bytes, UDP to 54")
    sh("test", "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)",
       "--hex", udp_packet(53), udp_packet(53, b"abcd"), udp_packet(54))

    with TempCgroup("bpfwall-demo") as cg:
        # Receivers live in the policed cgroup: their sockets are its sockets.
        udp_open, udp_closed = cg.socket(), cg.socket()
        tcp_open, tcp_closed = cg.socket(type=socket.SOCK_STREAM), cg.socket(type=socket.SOCK_STREAM)
        for s in (udp_open, udp_closed, tcp_open, tcp_closed):
            s.bind(("127.0.0.1", 0))
        tcp_open.listen(8)
        tcp_closed.listen(8)
        p_udp_open, p_udp_closed = udp_open.getsockname()[1], udp_closed.getsockname()[1]
        p_tcp_open, p_tcp_closed = tcp_open.getsockname()[1], tcp_closed.getsockname()[1]
        expr = f"icmp || (udp && local_port in {{{p_udp_open}, $extra}}) || (tcp && local_port == {p_tcp_open})"
        try:
            print(f"\n# The unit's cgroup is {cg.path}; its sockets listen on UDP {p_udp_open}, {p_udp_closed}"
                  f" and TCP {p_tcp_open}, {p_tcp_closed}.")
            sh("load", UNIT, "--ingress", expr, "--param", "extra=0")
            sh("attach", UNIT, cg.path)
            for port, sock in ((p_udp_open, udp_open), (p_udp_closed, udp_closed)):
                send_udp(port)
                print(f"# demo: UDP to {port}: {drain(sock)}/5 datagrams arrived")
            for port in (p_tcp_open, p_tcp_closed):
                print(f"# demo: TCP connect to {port}: {'accepted' if tcp_connects(port) else 'no answer (SYN dropped)'}")
            sh("stats", UNIT)
            print(f"\n# Open UDP {p_udp_closed} live, without reloading:")
            sh("set", UNIT, f"extra={p_udp_closed}")
            send_udp(p_udp_closed)
            print(f"# demo: UDP to {p_udp_closed}: {drain(udp_closed)}/5 datagrams arrived")
            print("\n# Reload with a new expression: swapped in place (the attachment is a pinned bpf_link: BPF_LINK_UPDATE), counters kept:")
            sh("load", UNIT, "--ingress", f"udp && local_port == {p_udp_closed}")
            send_udp(p_udp_open)
            print(f"# demo: UDP to {p_udp_open}: {drain(udp_open)}/5 datagrams arrived")
            sh("stats", UNIT)
            sh("list")
        finally:
            for s in (udp_open, udp_closed, tcp_open, tcp_closed):
                s.close()
            sh("unload", UNIT, check=False)
            try:
                os.rmdir(ENV["BPFWALL_PIN_ROOT"])
            except OSError:
                pass
            time.sleep(0.05)
    print("\ndemo done: pins, cgroup and programs removed.")


if __name__ == "__main__":
    main()
