"""Sets against the real kernel: counted before anything is enumerated, capacities that say
what they cost, and live changes that are all or nothing (issue 8, items 7, 8, 11, 14)."""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

from bpfwall import capacity
from bpfwall.backends import bpf
from bpfwall.kernel import maps, pins
from bpfwall.kernel import syscall as sc
from bpfwall.kernel.errors import KernelError
from bpfwall.program_contract import number_key, set_map
from tests.kernel.test_cli import ok, pins_of, run

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

BPFWALL = os.path.join(os.path.dirname(sys.executable), "bpfwall")
BPF_MAP_FREEZE = 22


def stats(capsys, unit="a.service") -> dict:
    return json.loads(ok(capsys, "stats", unit, "--json"))


def bounded(*argv, limit=1 << 30, timeout=60):
    """The real command in a process that may use at most `limit` bytes of address space
    (the old code expanded ranges until it had gigabytes); (result, seconds)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.monotonic()
    r = subprocess.run([BPFWALL, *argv], capture_output=True, text=True, preexec_fn=cap, timeout=timeout)
    return r, time.monotonic() - start


def memlock(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("memlock:"):
                return int(line.split()[1])
    raise AssertionError("no memlock in fdinfo")


def set_fd(pin_root, unit, name) -> int:
    return pins.get(os.path.join(bpf.unit_dir(pin_root, unit), set_map(name)))


# IPv4 10.0.0.1 → 10.0.0.2, UDP 40000 → 53, no payload
UDP_TO_53 = "4500001c00000000401100000a0000010a0000029c4000350008" + "0000"


# -- item 7: number ranges are counted, never expanded to be refused -------------------------

HUGE = [
    (["set", "a.service", "@s+0..4294967295"], "4294967296"),
    (["set", "a.service", "@s=0..20000000"], "20000001"),
    (["load", "b.service", "--ingress", "dst_port in @s", "--set", "s=0..4294967295"], "4294967296"),
    (["test", "dst_port in @s", "--set", "s=0..4294967295", "--hex", UDP_TO_53], "4294967296"),
]


@pytest.mark.parametrize("argv,count", HUGE, ids=[" ".join(a[:3]) for a, _ in HUGE])
def test_huge_ranges_are_refused_at_once(capsys, pin_root, argv, count):
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s", "--set", "s=1..10")
    before = pins_of(pin_root)
    r, seconds = bounded(*argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("bpfwall: error: "), r.stderr
    assert count in r.stderr and "4096" in r.stderr, r.stderr  # the count and the capacity
    assert seconds < 1, f"took {seconds:.1f} s to refuse"
    assert pins_of(pin_root) == before
    assert stats(capsys)["sets"]["s"] == [str(v) for v in range(1, 11)]


def test_huge_range_removal_is_fast_and_exact(capsys, pin_root):
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s", "--set", "s=5,70000,4294967295")
    r, seconds = bounded("set", "a.service", "@s-0..4294967294")
    assert r.returncode == 0 and r.stdout == "@s: removed 2\n", r.stderr
    assert seconds < 1
    assert stats(capsys)["sets"]["s"] == ["4294967295"]


def test_capacity_counts_the_contents_after_every_change(capsys, pin_root):
    # 15 elements on the way, 5 in the end: the end is what must fit.
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s", "--set-capacity", "10")
    assert ok(capsys, "set", "a.service", "@s+0..14", "@s-0..9").splitlines() == ["@s: added 15", "@s: removed 10"]
    assert stats(capsys)["sets"]["s"] == ["10", "11", "12", "13", "14"]


# -- item 14: replacing a near-full set ---------------------------------------------------------

@pytest.mark.parametrize("expr,old,new,shown", [
    ("dst_port in @s", "0..99", "1000..1099", [str(v) for v in range(1000, 1100)]),
    ("saddr in @s", ",".join(f"10.0.0.{i}" for i in range(100)), ",".join(f"10.0.1.{i}" for i in range(100)),
     [f"10.0.1.{i}/32" for i in range(100)]),
], ids=["numbers", "addresses"])
def test_full_set_replaced_by_a_disjoint_one(capsys, pin_root, expr, old, new, shown):
    ok(capsys, "load", "a.service", "--ingress", expr, "--set-capacity", "100", "--set", f"s={old}")
    assert ok(capsys, "set", "a.service", f"@s={new}") == "@s: replaced, 100 element(s)\n"
    assert stats(capsys)["sets"]["s"] == shown


def test_kept_elements_are_never_missing(capsys, pin_root):
    """Full set, half replaced: no room for old and new at once, so the elements that go are
    removed first; the ones kept across the change must be present at every instant."""
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s", "--set-capacity", "200", "--set", "s=0..199")
    fd = set_fd(pin_root, "a.service", "s")
    kept = [number_key(v) for v in range(100, 200)]
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            for k in kept:
                if maps.map_lookup(fd, k, 1) is None:
                    missing.append(k)

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        with bpf.PinnedUnit.open(pin_root, "a.service") as u:
            for step in range(10):
                lo = 1000 + 100 * (step % 2)  # 100..199 stay; the other hundred alternate
                u.replace_set("s", [(100, 199), (lo, lo + 99)])
    finally:
        stop.set()
        reader.join()
        os.close(fd)
    assert missing == []
    assert stats(capsys)["sets"]["s"] == [str(v) for v in [*range(100, 200), *range(1100, 1200)]]


@pytest.mark.parametrize("fail_after", [0, 25, 49])  # each change adds 50 numbers
@pytest.mark.parametrize("old,new", [((0, 99), (50, 149)), ((0, 49), (1000, 1049))],
                         ids=["no-room-for-both", "room-for-both"])
def test_a_write_failing_half_way_puts_the_old_contents_back(capsys, pin_root, monkeypatch, fail_after, old, new):
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s", "--set-capacity", "100",
       "--set", f"s={old[0]}..{old[1]}")
    real, calls = maps.map_update, []

    def failing(fd, key, value, flags=sc.BPF_ANY):  # the kernel refusing one update half way
        calls.append(key)
        if len(calls) == fail_after + 1:
            raise KernelError(errno.ENOMEM, "cannot update key: Cannot allocate memory")
        real(fd, key, value, flags)

    monkeypatch.setattr(maps, "map_update", failing)
    with bpf.PinnedUnit.open(pin_root, "a.service") as u:
        with pytest.raises(KernelError):
            u.replace_set("s", [new])
    monkeypatch.undo()
    assert stats(capsys)["sets"]["s"] == [str(v) for v in range(old[0], old[1] + 1)]


# -- item 14: `set` is all or nothing -----------------------------------------------------------

UNIT = "dst_port in @s || dst_port in @t || dst_port == $a"


def test_set_checks_capacity_before_writing_anything(capsys, pin_root):
    ok(capsys, "load", "a.service", "--ingress", UNIT, "--param", "a=5", "--set", "s=1", "--set", "t=2",
       "--set-capacity", "10")
    for change in (["a=1", "@s+0..100"], ["@s+3", "a=1", "@t+0..10"], ["mode=audit", "@t=0..10"],
                   ["a=1", "@s+3", "@s=0..10"]):
        code, out, err = run(capsys, "set", "a.service", *change)
        assert code == 2 and out == "", change
        assert "its map holds 10" in err, err
        s = stats(capsys)
        assert (s["params"], s["sets"], s["mode"]) == ({"a": 5}, {"s": ["1"], "t": ["2"]}, "enforce"), change


def test_a_kernel_failure_mid_way_rolls_back(capsys, pin_root):
    ok(capsys, "load", "a.service", "--ingress", UNIT, "--param", "a=5", "--set", "s=1", "--set", "t=2")
    fd = set_fd(pin_root, "a.service", "t")
    try:
        # A frozen map refuses every write from user space: @t's write fails after $a,
        # mode and @s were written.
        sc.bpf(BPF_MAP_FREEZE, sc.MapElemAttr(map_fd=fd), "freeze")
    finally:
        os.close(fd)
    code, out, err = run(capsys, "set", "a.service", "a=1", "mode=audit", "@s+7", "@s-1", "@t+8")
    assert code == 2 and "Operation not permitted" in err, err
    s = stats(capsys)
    assert (s["params"], s["sets"], s["mode"]) == ({"a": 5}, {"s": ["1"], "t": ["2"]}, "enforce")


# -- item 8: what a capacity costs ----------------------------------------------------------------

def test_a_capacity_of_gigabytes_is_refused(capsys, pin_root):
    code, out, err = run(capsys, "load", "b.service", "--ingress", "dst_port in @s || saddr in @a",
                         "--set-capacity", "16777216")
    assert code == 2 and out == ""
    total = capacity.show_bytes(capacity.estimate({"s": "number", "a": "address"}, 16777216))
    assert err.startswith(f"bpfwall: error: --set-capacity 16777216: the unit's sets would take about {total}"), err
    assert "--force-capacity" in err and err.count("\n") == 1, err
    assert not os.path.exists(pin_root) or pins_of(pin_root) == []


def test_force_capacity_allows_a_large_one(capsys, pin_root):
    # An address set allocates as it fills: a large capacity costs nothing until used.
    argv = ["load", "b.service", "--ingress", "saddr in @a", "--set-capacity", "4000000"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "about 488.3 MiB" in err and "--force-capacity" in err, err
    ok(capsys, *argv, "--force-capacity", "--set", "a=10.0.0.0/8")
    fd = set_fd(pin_root, "b.service", "a")
    try:
        assert maps.map_info(fd).max_entries == 4000000
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [1000, 4096, 70000])
def test_the_estimate_covers_what_the_kernel_accounts(capsys, pin_root, size):
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s || saddr in @a", "--set-capacity", str(size))
    with bpf.PinnedUnit.open(pin_root, "a.service") as u:
        u.replace_set("a", [ipaddress.ip_network(i + (10 << 24)) for i in range(size)])  # full
        hash_bytes, lpm_bytes = memlock(u.maps[set_map("s")]), memlock(u.maps[set_map("a")])
    # A preallocated hash: the kernel's own figure, from load on, empty.
    assert hash_bytes <= capacity.set_map_bytes("number", size) <= hash_bytes * 1.05
    # A full LPM trie: the kernel counts its leaves; the estimate adds intermediate nodes.
    assert lpm_bytes <= capacity.set_map_bytes("address", size)


# -- item 11: out of memory is one line too -------------------------------------------------------

def test_out_of_memory_is_one_line(tmp_path, pin_root):
    packets = tmp_path / "packets"
    packets.write_text("00\n" * 3_000_000)  # a list of 3,000,000 lines does not fit in 64 MiB more
    script = ("import resource, sys\n"
              "from bpfwall import cli\n"
              "import bpfwall.backends.bpf, bpfwall.lang.packet, bpfwall.lang.checker, bpfwall.build\n"
              "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize:')).split()[1]) * 1024\n"
              "resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "test", "udp", "--packets", str(packets)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "bpfwall: error: out of memory: the request needs more memory than bpfwall may use here\n"
