"""The two compilers (bpfwall/compilers.py): bcc builds the object clang builds, in layout; the
cache keeps them apart; `auto` takes bcc on a host without the clang binary, and a host with
neither gets one error. Verdicts of both are compared at scale in test_differential.py and on
real traffic in test_traffic.py."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bpfwall import bcc_build
from bpfwall.backends import bpf
from bpfwall.build import UnitProgram, build
from bpfwall.kernel import btf, loader
from bpfwall.lang.checker import analyze
from tests.kernel.invoke import REPO, bpfwall, one_error_line, pins_of

pytestmark = pytest.mark.kernel

EXPR = "tcp && dst_port in @web || udp && $port == dst_port"
NO_CLANG = {"PATH": "/nonexistent", "BPFWALL_CLANG": "clang"}  # shutil.which finds no clang


def program(compiler: str, expr: str = EXPR) -> UnitProgram:
    return UnitProgram(analyze(expr), analyze("icmp"), compiler=compiler)


def layout(obj) -> dict:
    """Every map's definition, with the BTF-described members of its key and value."""
    types = btf.parse(obj.btf)

    def members(type_id: int):
        t = types.resolve(type_id) if type_id else None
        if t is None or t.kind != btf.KIND_STRUCT:
            return types.size(type_id) if type_id else None
        return [(name, types.resolve(member).name, offset) for name, member, offset in t.members]
    return {name: (m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                   members(m.btf_key_type_id), members(m.btf_value_type_id)) for name, m in obj.maps.items()}


def test_bcc_builds_the_maps_and_sections_clang_builds(cache_dir):
    clang, bcc = build(program("clang")), build(program("bcc"))
    assert layout(bcc) == layout(clang)
    # the members bpftool shows, from the map's BTF: the drop events' limit, the counters
    assert [m[0] for m in layout(bcc)["log_limit"][6]][:2] == ["rate", "burst"]
    assert layout(bcc)["counters"][6] == [("packets", "unsigned long long", 0), ("bytes", "unsigned long long", 64)]
    assert set(bcc.programs) == set(clang.programs) == set(loader.SECTIONS)
    assert bcc.license == clang.license == "GPL"
    assert {p.name for p in bcc.programs.values()} == {p.name for p in clang.programs.values()}
    with loader.load(bcc) as loaded:  # the kernel takes it: maps with their BTF, programs verified
        assert set(loaded.progs) == set(loader.SECTIONS)


def test_a_bcc_unit_is_pinned_and_described_like_a_clang_one(pin_root, cache_dir):
    for compiler in ("bcc", "clang", "bcc"):  # reloads across compilers keep the maps
        bpf.load(pin_root, "c.service", program(compiler), params={"port": 53}, sets={"web": [80, 443]})
        stats = bpf.stats(pin_root, "c.service")
        assert stats["compiler"] == compiler
        assert stats["params"] == {"port": 53} and stats["sets"]["web"] == ["80", "443"]
    assert [row["compiler"] for row in bpf.summary(pin_root)] == ["bcc"]
    names = sorted(os.path.basename(p) for p in pins_of(pin_root))
    assert names == ["counters", "egress", "events", "events_lost", "ingress", "log_limit", "meta", "mode", "params",
                     "set_web"]
    shown = subprocess.run(["bpftool", "-j", "map", "show", "pinned", f"{bpf.unit_dir(pin_root, 'c.service')}/log_limit"],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["btf_id"] > 0  # bpftool sees the map's BTF


def test_the_cache_keeps_each_compilers_object(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    objects = {c: build(program(c), cache) for c in ("clang", "bcc")}
    assert len(list(cache.glob("*.json"))) == 2

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"a compiler ran: {args[0]}")
    monkeypatch.setattr(subprocess, "run", no_compiler)
    for compiler, obj in objects.items():  # warm: both read back, neither compiles
        again = build(program(compiler), cache)
        assert [p.insns for p in again.programs.values()] == [p.insns for p in obj.programs.values()]


def test_auto_without_the_clang_binary_loads_through_bcc(pin_root, cache_dir):
    r = bpfwall("load", "a.service", "--ingress", "tcp", env={**NO_CLANG, "BPFWALL_PIN_ROOT": pin_root})
    assert r.returncode == 0, r.stderr
    r = bpfwall("stats", "a.service", "--json", env={"BPFWALL_PIN_ROOT": pin_root})
    assert json.loads(r.stdout)["compiler"] == "bcc"
    r = bpfwall("list", env={"BPFWALL_PIN_ROOT": pin_root})
    assert "  compiler: bcc" in r.stdout.splitlines()
    # clang asked for by name, and not there: said so, nothing changed
    r = bpfwall("--compiler", "clang", "load", "a.service", "--ingress", "udp",
                env={**NO_CLANG, "BPFWALL_PIN_ROOT": pin_root})
    one_error_line(r, "clang not found", "apt-get install clang")
    assert bpf.stats(pin_root, "a.service")["ingress"] == "tcp"


def test_neither_compiler_is_one_error(pin_root, cache_dir):
    """No clang on PATH, and a Python that cannot import bcc (-S: no site-packages; bpfwall itself
    comes from the working directory)."""
    env = {**NO_CLANG, "BPFWALL_PIN_ROOT": pin_root}
    r = subprocess.run([REPO / ".venv" / "bin" / "python", "-S", "-m", "bpfwall", "load", "n.service", "--ingress",
                        "tcp"], capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO, timeout=60)
    one_error_line(r, "no compiler for BPF programs", "clang not found", "bcc is not installed",
                   "apt-get install python3-bpfcc")
    assert pins_of(pin_root) == []


def test_missing_kernel_headers_are_named_and_auto_takes_clang(pin_root, cache_dir, tmp_path):
    env = {"BCC_KERNEL_SOURCE": str(tmp_path), "BPFWALL_PIN_ROOT": pin_root}
    r = bpfwall("--compiler", "bcc", "load", "h.service", "--ingress", "tcp", env=env)
    one_error_line(r, "bcc needs kernel headers", f"BCC_KERNEL_SOURCE={tmp_path}", "include/linux/kconfig.h")
    assert pins_of(pin_root) == []
    r = bpfwall("load", "h.service", "--ingress", "tcp", env=env)  # auto: clang is here
    assert r.returncode == 0, r.stderr
    assert bpf.stats(pin_root, "h.service")["compiler"] == "clang"


def test_the_object_holds_the_code_bcc_generated(cache_dir, monkeypatch, tmp_path):
    """bcc_build compares the object's instructions with those libbcc's own code generator made:
    a worker whose report differs (here: one instruction short) is refused."""
    worker = tmp_path / "bcc_worker.py"
    worker.write_text(bcc_build.WORKER.read_text().replace("ctypes.string_at(start, size)",
                                                           "ctypes.string_at(start, size - 8)"))
    assert worker.read_text() != bcc_build.WORKER.read_text()
    monkeypatch.setattr(bcc_build, "WORKER", Path(worker))
    from bpfwall.build import BuildError

    with pytest.raises(BuildError, match="does not hold the code bcc generated"):
        build(program("bcc", "udp && dst_port == 7"), tmp_path)


def test_a_unit_loaded_before_bcc_reads_as_built_by_clang(pin_root, cache_dir):
    """Meta written by a bpfwall without compilers names none: only clang built units then."""
    bpf.load(pin_root, "old.service", program("clang", "tcp"))
    with bpf.PinnedUnit.open(pin_root, "old.service") as u:
        old = {k: v for k, v in u.meta.items() if k != "compiler"}
        u.write_meta(json.dumps(old, sort_keys=True).encode())
    with bpf.PinnedUnit.open(pin_root, "old.service") as u:
        assert u.meta["compiler"] == "clang"
    assert bpf.stats(pin_root, "old.service")["compiler"] == "clang"


def test_the_policys_compiler_and_the_command_lines(pin_root, cache_dir, trusted_tmp_path, capsys, monkeypatch):
    """`compiler =` in [defaults] builds the policy's units; --compiler (or $BPFWALL_COMPILER)
    wins over it; `bpfwall apply` (the loader unit's command, the hand-off's first half) shows it."""
    from bpfwall.cli import main

    monkeypatch.delenv("BPFWALL_COMPILER", raising=False)
    policy = trusted_tmp_path / "policy"
    policy.mkdir()
    (policy / "10-test.toml").write_text('[defaults]\ncompiler = "bcc"\n\n[units."p.service"]\ningress = "tcp"\n')
    assert main(["apply", "p.service", "--policy-dir", str(policy)]) == 0
    assert bpf.stats(pin_root, "p.service")["compiler"] == "bcc"
    assert main(["--compiler", "clang", "apply", "p.service", "--policy-dir", str(policy)]) == 0
    assert bpf.stats(pin_root, "p.service")["compiler"] == "clang"
    monkeypatch.setenv("BPFWALL_COMPILER", "bcc")
    assert main(["apply", "p.service", "--policy-dir", str(policy)]) == 0
    capsys.readouterr()
    assert main(["stats", "p.service"]) == 0
    assert "  compiler: bcc" in capsys.readouterr().out.splitlines()


def test_build_many_builds_each_program_with_its_compiler(tmp_path):
    """clang's units batched, bcc's one a run, in one call; each object as build() makes it."""
    from bpfwall.build import build_many

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    programs = [program("bcc", "udp && dst_port == 9"), program("clang", "udp && dst_port == 9"),
                program("clang", "tcp"), program("bcc", "udp && dst_port == 9")]
    objects = build_many(programs, cache, jobs=2)
    for p, obj in zip(programs, objects, strict=True):
        assert [q.insns for q in obj.programs.values()] == [q.insns for q in build(p, cache).programs.values()]
    assert [q.insns for q in objects[0].programs.values()] != [q.insns for q in objects[1].programs.values()]


@pytest.mark.parametrize("compiler", ["clang", "bcc"])
@pytest.mark.parametrize("text", [
    # bcc's LLVM merged the lookup's `!= 0` with the ifname test into `(value | bits) != 0`:
    # arithmetic on a map value before its null check, which the verifier refuses (found by the
    # differential test; port_filter.c's found() keeps the lookup's answer an int)
    '!(remote_addr in {10.0.0.0/8, ::1} || saddr in @hosts || ifname in {"wlan*", "wg*"})',
    'dst_port in @ports || ifname == "wg0"',
])
def test_a_set_lookup_ored_with_other_tests_loads(cache_dir, compiler, text):
    checked = analyze(text)
    for program in (UnitProgram(checked, None, compiler=compiler), UnitProgram(None, checked, compiler=compiler)):
        with loader.load(build(program, cache=cache_dir)) as loaded:
            assert set(loaded.progs) == {"cgroup_skb/ingress", "cgroup_skb/egress"}
