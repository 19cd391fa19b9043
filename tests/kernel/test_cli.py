"""The bpfwall command end to end against the real kernel: load, attach, stats, set, unload, errors."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from bpfwall.backends import bpf
from bpfwall.kernel import cgroup
from tests.kernel.invoke import ok, pins_of, run

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_leaks")]

DNS_WEB = "icmp || (udp && dst_port == 53) || (tcp && dst_port == 80)"


def udp4(dport, payload=b"", sport=40000, proto=17):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, proto, 0,
                     socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2"))
    return ip + udp


def udp6(dport, payload=b"", proto=17):
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(udp), proto, 64,
                     socket.inet_pton(socket.AF_INET6, "2001:db8::1"), socket.inet_pton(socket.AF_INET6, "2001:db8::2"))
    return ip + udp


# -- test: the acceptance example ---------------------------------------------

@pytest.mark.parametrize("payload", [b"", b"x", b"abcd", b"y" * 100])
@pytest.mark.parametrize("build", [udp4, udp6])
def test_short_udp_to_53_passes(capsys, pin_root, payload, build):
    out = ok(capsys, "test", DNS_WEB, "--hex", build(53, payload).hex(), build(54, payload).hex())
    assert out.split() == ["pass", "drop"]
    assert pins_of(pin_root) == []


def test_test_json_reports_reference_and_fields(capsys, pin_root):
    out = ok(capsys, "test", "udp && local_port == $p", "--param", "p=53", "--json",
             "--hex", udp4(53).hex(), udp6(53).hex(), udp4(80).hex())
    rows = json.loads(out)["packets"]
    assert [r["verdict"] for r in rows] == ["pass", "pass", "drop"]
    assert all(r["agree"] for r in rows)
    assert rows[1]["fields"]["dst_port"] == 53 and rows[1]["fields"]["ipv6"] is True


def test_test_direction_aliases(capsys, pin_root):
    # local_port is the destination on ingress, the source on egress.
    pkt = udp4(53, sport=5000).hex()
    assert ok(capsys, "test", "local_port == 53", "--direction", "ingress", "--hex", pkt).split() == ["pass"]
    assert ok(capsys, "test", "local_port == 53", "--direction", "egress", "--hex", pkt).split() == ["drop"]


def test_test_packets_file_and_sets(capsys, pin_root, tmp_path):
    f = tmp_path / "pkts"
    f.write_text(f"# comment\n{udp4(53).hex()}\n\n{udp4(99).hex()}  # trailing\n{udp6(7).hex()}\n")
    out = ok(capsys, "test", "dst_port in @ports || daddr in @nets", "--set", "ports=50..60",
             "--set", "nets=2001:db8::/64", "--packets", str(f))
    assert out.split() == ["pass", "drop", "pass"]


def test_a_packet_over_the_test_run_limit_is_named_and_the_others_are_judged(capsys, pin_root, tmp_path):
    # The kernel test-runs at most a page less its skb head- and tailroom (3,698 IP bytes on
    # x86-64): the long packet's line and the limit are named, the others still get verdicts.
    f = tmp_path / "pkts"
    f.write_text(f"{udp4(53).hex()}\n{udp4(53, b'x' * 4000).hex()}\n{udp6(54).hex()}\n")
    code, out, err = run(capsys, "test", "udp && dst_port == 53", "--packets", str(f))
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == "pass" and lines[2] == "drop"
    assert lines[1].startswith(f"error: {f}:2: 4028 bytes is over the kernel's test-run limit of ")
    limit = int(lines[1].split("limit of ")[1].split()[0])
    assert 1500 <= limit < 4028
    assert err.strip() == "bpfwall: error: 1 of 3 packets not judged (see above)"
    # The limit is the kernel's: a packet of exactly that length is judged.
    fits = udp4(53, b"x" * (limit - 28)).hex()
    assert ok(capsys, "test", "udp && dst_port == 53", "--hex", fits).split() == ["pass"]


# -- load / attach / stats / set / unload -------------------------------------

def test_full_lifecycle(capsys, pin_root, temp_cgroup):
    unit = "web-1.service"
    out = ok(capsys, "load", unit, "--ingress", "udp && dst_port in {53, $extra} || dst_port in @more",
             "--egress", "true", "--param", "extra=5353", "--set", "more=7,8")
    key_dir = os.path.join(pin_root, "web-1+service")
    assert f"{key_dir}/ingress" in out
    assert {os.path.basename(p) for p in pins_of(pin_root)} == {
        "ingress", "egress", "counters", "mode", "params", "meta", "set_more", "events", "log_limit", "events_lost"}
    assert ok(capsys, "path", unit, "egress").strip() == f"{key_dir}/egress"
    assert json.loads(ok(capsys, "path", unit, "ingress", "--json"))["path"] == f"{key_dir}/ingress"

    assert "ingress attached" in ok(capsys, "attach", unit, temp_cgroup.path)
    assert "already attached" in ok(capsys, "attach", unit, temp_cgroup.path)  # no-op
    rel = os.path.relpath(temp_cgroup.path, cgroup.cgroup2_mount())
    assert "already attached" in ok(capsys, "attach", unit, rel)  # relative to the mount
    flags, ids = cgroup.query(temp_cgroup.path, "ingress")
    assert len(ids) == 1

    stats = json.loads(ok(capsys, "stats", unit, "--json"))
    assert stats["params"] == {"extra": 5353}
    assert stats["sets"] == {"more": ["7", "8"]}
    assert stats["mode"] == "enforce"
    assert {(a["cgroup"], a["direction"]) for a in stats["attached"]} == {
        (temp_cgroup.path, "ingress"), (temp_cgroup.path, "egress")}
    # The text names the cgroup once, with both directions.
    assert f"  attached: {temp_cgroup.path} (ingress, egress)" in ok(capsys, "stats", unit).splitlines()

    ok(capsys, "set", unit, "extra=9", "@more+10,20..22", "@more-7", "mode=audit")
    stats = json.loads(ok(capsys, "stats", unit, "--json"))
    assert stats["params"] == {"extra": 9}
    assert stats["sets"]["more"] == ["8", "10", "20", "21", "22"]
    assert stats["mode"] == "audit"
    ok(capsys, "set", unit, "@more=1")
    assert json.loads(ok(capsys, "stats", unit, "--json"))["sets"]["more"] == ["1"]

    listed = json.loads(ok(capsys, "list", "--json"))
    assert [u["unit"] for u in listed] == [unit]
    assert len(listed[0]["attached"]) == 2

    # Reload: programs swapped in place on the cgroup, params and mode kept.
    old_ids = set(ids)
    out = json.loads(ok(capsys, "load", unit, "--ingress", "udp && dst_port in {53, $extra}", "--json"))
    assert {(r["cgroup"], r["direction"]) for r in out["replaced"]} == {(temp_cgroup.path, "ingress")}
    assert {(r["cgroup"], r["direction"]) for r in out["detached"]} == {(temp_cgroup.path, "egress")}
    flags, ids = cgroup.query(temp_cgroup.path, "ingress")
    assert len(ids) == 1 and set(ids) != old_ids
    assert cgroup.query(temp_cgroup.path, "egress")[1] == []
    stats = json.loads(ok(capsys, "stats", unit, "--json"))
    assert stats["params"] == {"extra": 9} and stats["mode"] == "audit" and stats["sets"] == {}
    assert not os.path.exists(os.path.join(key_dir, "set_more"))
    assert not os.path.exists(os.path.join(key_dir, "egress"))

    assert "ingress detached" in ok(capsys, "detach", unit, temp_cgroup.path)
    assert "was not attached" in ok(capsys, "detach", unit, temp_cgroup.path)
    ok(capsys, "attach", unit, temp_cgroup.path)
    out = ok(capsys, "unload", unit)
    assert "detached from 1" in out
    assert cgroup.query(temp_cgroup.path, "ingress")[1] == []
    assert pins_of(pin_root) == [] and not os.path.exists(key_dir)


def test_reload_keeps_counters(capsys, pin_root):
    unit = "count.service"
    ok(capsys, "load", unit, "--ingress", "udp")
    u = bpf.PinnedUnit.open(pin_root, unit)
    try:
        from bpfwall.kernel import progs

        for _ in range(3):
            progs.prog_test_run(u.progs["ingress"], b"\0" * 12 + b"\x08\x00" + udp4(1))
    finally:
        u.close()
    ok(capsys, "load", unit, "--ingress", "tcp")
    stats = json.loads(ok(capsys, "stats", unit, "--json"))
    assert stats["counters"]["ingress"]["pass"]["packets"] == 3
    assert stats["counters"]["ingress"]["pass"]["bytes"] == 3 * len(udp4(1))


def test_pin_for_ip_filter_path(capsys, pin_root):
    extra = f"{pin_root}-extra"
    ok(capsys, "load", "x", "--ingress", DNS_WEB)
    try:
        ok(capsys, "pin", "x", "ingress", extra)
        from bpfwall.kernel import pins, progs

        a, b = pins.get(extra), pins.get(os.path.join(pin_root, "x", "ingress"))
        try:
            assert progs.prog_info(a).id == progs.prog_info(b).id
        finally:
            os.close(a)
            os.close(b)
    finally:
        if os.path.exists(extra):
            os.unlink(extra)


def test_makefile_well_known_usage(pin_root):
    """make FILTER=… BPFNAME=x load pins /sys/fs/bpf/x, usable as IPIngressFilterPath=; unload removes it."""
    import uuid

    from bpfwall.kernel import pins, progs

    name = f"bpfwall-test-mk{uuid.uuid4().hex[:8]}"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, BPFWALL_PIN_ROOT=pin_root)
    try:
        proc = subprocess.run(["make", "-s", "-C", repo, "FILTER=icmp || (udp && dst_port == 53)",
                               f"BPFNAME={name}", "load"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert f"IPIngressFilterPath=/sys/fs/bpf/{name}" in proc.stdout
        fd = pins.get(f"/sys/fs/bpf/{name}")
        try:
            assert progs.prog_info(fd).name.startswith("bpfw_i_")
        finally:
            os.close(fd)
        proc = subprocess.run(["make", "-s", "-C", repo, f"BPFNAME={name}", "unload"], env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.exists(f"/sys/fs/bpf/{name}")
        assert bpf.units(pin_root) == []
    finally:
        if os.path.exists(f"/sys/fs/bpf/{name}"):
            os.unlink(f"/sys/fs/bpf/{name}")


def test_map_dump_is_readable_with_btf(capsys, pin_root):
    ok(capsys, "load", "dump.service", "--ingress", "dst_port == $web_port", "--param", "web_port=8080")
    proc = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", os.path.join(pin_root, "dump+service", "params")],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "No such file" in proc.stderr:
        pytest.skip("bpftool missing")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["formatted"]["value"] == {"web_port": 8080}


def test_console_script_exit_codes(pin_root):
    exe = os.path.join(os.path.dirname(sys.executable), "bpfwall")
    good = subprocess.run([exe, "check", "tcp&&dst_port==80"], capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.strip() == "tcp && dst_port == 80"
    bad = subprocess.run([exe, "check", "dst_port && udp"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[0].startswith("bpfwall: error: ")
    assert "dst_port is a number; compare it, e.g. dst_port == 53" in bad.stderr


# -- bad input: message, exit 2, nothing changed ------------------------------

BAD_INVOCATIONS = [
    (["load", "a.service"], "give --ingress EXPR, --egress EXPR or both"),
    (["load", "a.service", "--ingress", "dst_port && udp"], "--ingress: column 1: dst_port is a number"),
    (["load", "a.service", "--egress", "tcp &&"], "--egress: "),
    (["load", "a.service", "--ingress", "dst_port == 70000"], "70000 is out of range for dst_port"),
    (["load", "a/b.service", "--ingress", "tcp"], "character '/' cannot occur in a systemd unit name"),
    (["load", "a b.service", "--ingress", "tcp"], "character ' ' cannot occur"),
    (["load", "", "--ingress", "tcp"], "the unit name is empty"),
    (["load", "x" * 300, "--ingress", "tcp"], "at most 255"),
    (["load", "a+b.service", "--ingress", "tcp"], "character '+' cannot occur"),
    (["load", ".hidden", "--ingress", "tcp"], "must not start with '.'"),
    (["load", "a.service", "--ingress", "dst_port == $p", "--param", "q=1"], "the filter has no parameter $q"),
    (["load", "a.service", "--ingress", "dst_port == $p", "--param", "p"], "p"),
    (["load", "a.service", "--ingress", "dst_port == $p", "--param", "p=abc"], "abc"),
    (["load", "a.service", "--ingress", "dst_port == $p", "--param", "p=-1"], "-1"),
    (["load", "a.service", "--ingress", "dst_port in @s", "--set", "t=1"], "the filter has no set @t"),
    (["load", "a.service", "--ingress", "dst_port in @s", "--set", "s=1,x"], "x"),
    (["load", "a.service", "--ingress", "saddr in @s", "--set", "s=10.0.0.1/8"], "10.0.0.0/8"),
    (["load", "a.service", "--ingress", "dst_port in @s", "--set", "s=1..100", "--set-capacity", "10"],
     "capacity"),
    (["load", "a.service", "--ingress", "tcp", "--set-capacity", "0"], "--set-capacity 0"),
    (["load", "a.service", "--ingress", "tcp", "--mode", "loose"], "invalid choice: 'loose'"),
    (["load", "a.service", "--ingress", "dst_port in @s", "--egress", "saddr in @s"], "@s"),
    (["attach", "nope.service", "/"], "unit nope.service is not loaded"),
    (["detach", "nope.service", "/"], "unit nope.service is not loaded"),
    (["stats", "nope.service"], "unit nope.service is not loaded"),
    (["unload", "nope.service"], "unit nope.service is not loaded"),
    (["set", "nope.service", "a=1"], "unit nope.service is not loaded"),
    (["set", "a.service", "justtext"], "write NAME=VALUE"),
    (["set", "a.service", "@s"], "write @set+ELEMENTS"),
    (["set", "a.service", "mode=lax"], "mode is enforce or audit"),
    (["path", "a.service", "sideways"], "invalid choice: 'sideways'"),
    (["path", "a/b", "ingress"], "cannot occur in a systemd unit name"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required"),
    (["test", "tcp"], "one of the arguments --hex --packets is required"),
    (["test", "tcp", "--hex", "zz"], "--hex #1: not a hex packet"),
    (["test", "tcp", "--hex", "4500"], "--hex #1: "),
    (["test", "tcp", "--hex", "7500000000000000000000000000000000000000"], "version 7"),
    (["test", "tcp", "--packets", "/nonexistent/file"], "No such file or directory"),
    (["test", "tcp", "--direction", "up", "--hex", "00"], "invalid choice: 'up'"),
    (["test", "dst_port == $p", "--param", "x=1", "--hex", udp4(1).hex()], "no parameter $x"),
    (["test", "udp", "--set", "s=1", "--hex", udp4(1).hex()], "no set @s"),
    (["check", "dts_port == 53"], "did you mean 'dst_port'"),
    (["check", "tcp == 1"], "tcp is a boolean"),
    (["check", "saddr"], "saddr is an address"),
    (["check", "(" * 300 + "tcp" + ")" * 300], "nests too deeply"),
    (["check", "x" * 70000], "65536"),
    (["explain", "udp &&& tcp"], "column"),
]


@pytest.mark.parametrize("argv,message", BAD_INVOCATIONS, ids=[" ".join(a)[:50] for a, _ in BAD_INVOCATIONS])
def test_bad_invocation(capsys, pin_root, argv, message):
    before = pins_of(pin_root) if os.path.isdir(pin_root) else []
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    first = err.splitlines()[0]
    assert first.startswith("bpfwall: error: ")
    assert message in err, err
    after = pins_of(pin_root) if os.path.isdir(pin_root) else []
    assert after == before


def test_bad_change_to_loaded_unit_changes_nothing(capsys, pin_root):
    ok(capsys, "load", "a.service", "--ingress", "dst_port in @s || dst_port == $p", "--param", "p=5", "--set", "s=1")
    for change in (["p=7", "q=1"], ["p=7", "@s+zz"], ["p=7", "@t+1"], ["p=7", "p=99999999999999999999999"]):
        code, out, err = run(capsys, "set", "a.service", *change)
        assert code == 2, change
        stats = json.loads(ok(capsys, "stats", "a.service", "--json"))
        assert stats["params"] == {"p": 5} and stats["sets"] == {"s": ["1"]}, change


def test_reload_with_bad_expression_keeps_old(capsys, pin_root, temp_cgroup):
    ok(capsys, "load", "a.service", "--ingress", "udp")
    ok(capsys, "attach", "a.service", temp_cgroup.path)
    before = cgroup.query(temp_cgroup.path, "ingress")
    code, _, err = run(capsys, "load", "a.service", "--ingress", "udp && dst_port == 99999")
    assert code == 2 and "out of range" in err
    assert cgroup.query(temp_cgroup.path, "ingress") == before


def test_missing_cgroup(capsys, pin_root):
    ok(capsys, "load", "a.service", "--ingress", "udp")
    code, _, err = run(capsys, "attach", "a.service", "/sys/fs/cgroup/unified/does-not-exist-bpfwall")
    assert code == 2 and "no such cgroup" in err
    code, _, err = run(capsys, "attach", "a.service", "relative/nope")
    assert code == 2 and "no such cgroup" in err


def test_pin_root_not_bpffs(capsys, tmp_path):
    code, _, err = run(capsys, "--pin-root", str(tmp_path / "pins"), "load", "a.service", "--ingress", "udp")
    assert code == 2
    assert "mount -t bpf -o mode=0700 bpf /sys/fs/bpf" in err
    assert not (tmp_path / "pins").exists() or list((tmp_path / "pins").iterdir()) == []


def test_non_multi_program_is_explained(capsys, pin_root, temp_cgroup):
    """A program attached without BPF_F_ALLOW_MULTI blocks us: the error says so and how to fix it."""
    ok(capsys, "load", "other", "--ingress", "true")
    ok(capsys, "load", "a.service", "--ingress", "udp")
    other = os.path.join(pin_root, "other", "ingress")
    # bpftool attaches without flags: an exclusive program, as old tools do.
    proc = subprocess.run(["bpftool", "cgroup", "attach", temp_cgroup.path, "ingress", "pinned", other],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "No such file" in proc.stderr:
        pytest.skip("bpftool missing")
    assert proc.returncode == 0, proc.stderr
    try:
        code, _, err = run(capsys, "attach", "a.service", temp_cgroup.path)
        assert code == 2
        assert "without BPF_F_ALLOW_MULTI" in err or "ALLOW_MULTI" in err
        assert temp_cgroup.path in err
        assert cgroup.query(temp_cgroup.path, "egress")[1] == []
    finally:
        subprocess.run(["bpftool", "cgroup", "detach", temp_cgroup.path, "ingress", "pinned", other])


def test_non_root_is_told_what_is_missing(pin_root):
    """As an unprivileged user: a one-line error naming the missing privilege, exit 2, no traceback."""
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv missing")
    exe = os.path.join(os.path.dirname(sys.executable), "bpfwall")
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    for argv in (["test", "tcp", "--hex", udp4(1).hex()], ["load", "x.service", "--ingress", "tcp"]):
        proc = subprocess.run([*nobody, exe, *argv], capture_output=True, text=True,
                              env=dict(os.environ, BPFWALL_PIN_ROOT=pin_root))
        if "Permission denied" in proc.stderr and "python" in proc.stderr.lower() and proc.returncode == 126:
            pytest.skip("the interpreter is not reachable for an unprivileged user here")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert "needs root" in proc.stderr
    assert bpf.units(pin_root) == []


def test_interrupted_load_leftovers(capsys, pin_root):
    """A unit directory a killed first load left behind (empty, or holding only `counters`) is
    ours: the next load completes it, and stats/unload work (it used to wedge the unit)."""
    os.makedirs(os.path.join(pin_root, "empty+service"))
    ok(capsys, "load", "empty.service", "--ingress", "udp")
    os.makedirs(os.path.join(pin_root, "odd+service"))
    from bpfwall.kernel import maps, pins, syscall

    fd = maps.map_create(syscall.BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    try:
        pins.pin(fd, os.path.join(pin_root, "odd+service", "counters"))
    finally:
        os.close(fd)
    code, _, err = run(capsys, "stats", "odd.service")
    assert code == 2 and "a load was cut short" in err
    ok(capsys, "load", "odd.service", "--ingress", "udp")
    assert json.loads(ok(capsys, "stats", "odd.service", "--json"))["ingress"] == "udp"
    ok(capsys, "unload", "odd.service")
    assert not os.path.exists(os.path.join(pin_root, "odd+service"))
