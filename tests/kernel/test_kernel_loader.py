"""The kernel layer's loader side: ELF reading, BTF, map and program loading, maps, test runs.

Uses the tiny programs of tests/kernel/data (compiled here with clang). Every
test checks that it leaves no program, map or fd of its own behind.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct

import pytest

pytestmark = pytest.mark.kernel

from bpfwall import objcache
from tests.kernel.kernel_objects import compile_test_objects, our_objects, wait_for_no_new_objects
ETH_IP = b"\0" * 12 + b"\x08\x00"
ETH_IP6 = b"\0" * 12 + b"\x86\xdd"
IPPROTO_UDP, IPPROTO_TCP = 17, 6


def ipv4(proto: int, daddr: str = "10.0.0.2", payload: bytes = b"\0" * 8) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                       socket.inet_aton("10.0.0.1"), socket.inet_aton(daddr)) + payload


def ipv6(nexthdr: int, payload: bytes = b"\0" * 8) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
                       socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                       socket.inet_pton(socket.AF_INET6, "2001:db8::2")) + payload


def addr_key(net: str) -> bytes:
    """The trie key of kernel_test.c: prefixlen counts the family byte."""
    n = ipaddress.ip_network(net)
    return struct.pack("=IB16s", 8 + n.prefixlen, n.version, n.network_address.packed)


# -- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, str]:
    return compile_test_objects(tmp_path_factory.mktemp("kernel-objects"))


@pytest.fixture(scope="module")
def obj(objects):
    from bpfwall.kernel.elf import read_object

    return read_object(objects["kernel_test"])


def bpf_fds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{n}").startswith("anon_inode:bpf")
               for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}"))


@pytest.fixture(autouse=True)
def no_leaks():
    """Our program and map ids (BPF_*_GET_NEXT_ID) and bpf fds are the same after the test.
    The kernel frees closed objects after an RCU grace period, so wait a little."""
    before, fds = our_objects(), bpf_fds()
    yield
    assert bpf_fds() == fds, "the test leaked bpf file descriptors"
    wait_for_no_new_objects(before)


# -- ELF and BTF ----------------------------------------------------------------

def test_read_object(obj):
    from bpfwall.kernel import syscall as sc

    assert set(obj.programs) == {"cgroup_skb/ingress", "cgroup_skb/egress"}
    assert obj.programs["cgroup_skb/ingress"].name == "kt_ingress"
    assert obj.programs["cgroup_skb/egress"].name == "kt_egress"
    assert obj.license == "GPL"
    m = obj.maps
    assert set(m) == {"kt_counters", "kt_ports", "kt_nets"}
    assert (m["kt_counters"].type, m["kt_counters"].key_size, m["kt_counters"].value_size,
            m["kt_counters"].max_entries) == (sc.BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 4)
    assert (m["kt_ports"].type, m["kt_ports"].value_size, m["kt_ports"].max_entries) == (sc.BPF_MAP_TYPE_HASH, 1, 16)
    assert (m["kt_nets"].type, m["kt_nets"].key_size, m["kt_nets"].flags) == (
        sc.BPF_MAP_TYPE_LPM_TRIE, 21, sc.BPF_F_NO_PREALLOC)
    assert all(d.btf_key_type_id and d.btf_value_type_id for d in m.values())
    for prog in obj.programs.values():
        assert len(prog.insns) % 8 == 0
        assert sorted(name for _, name in prog.map_relocs) == ["kt_counters", "kt_nets", "kt_ports"]
        for index, _ in prog.map_relocs:
            assert prog.insns[index * 8] == 0x18  # ld_imm64
        assert len(prog.func_info) == 8 and prog.line_info
    assert objcache.from_plain(json.loads(json.dumps(objcache.to_plain(obj)))) == obj  # cacheable


def test_object_btf_is_fixed_up(objects, obj):
    """clang leaves DATASEC sizes and variable offsets 0; the loader sets them from the ELF."""
    from elftools.elf.elffile import ELFFile

    from bpfwall.kernel import btf

    with open(objects["kernel_test"], "rb") as f:
        elf = ELFFile(f)
        raw = btf.parse(elf.get_section_by_name(".BTF").data())
        maps_size = elf.get_section_by_name(".maps")["sh_size"]
        offsets = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}
    assert raw.datasec(".maps").size == 0
    fixed = btf.parse(obj.btf)
    sec = fixed.datasec(".maps")
    assert sec.size == maps_size
    assert [(fixed.types[t].name, off) for t, off, _ in sec.secinfo] == sorted(
        ((fixed.types[t].name, offsets[fixed.types[t].name]) for t, _, _ in sec.secinfo), key=lambda x: x[1])
    # sizes resolve through typedefs: the key of kt_counters is __u32
    assert fixed.types[obj.maps["kt_counters"].btf_key_type_id].name == "__u32"
    assert fixed.size(obj.maps["kt_counters"].btf_key_type_id) == 4


def test_global_data_is_refused_by_name(objects):
    from bpfwall.kernel.elf import read_object
    from bpfwall.kernel.errors import KernelError

    with pytest.raises(KernelError) as e:
        read_object(objects["kernel_test_global"])
    assert "'kt_hits' in .bss" in str(e.value) and "cgroup_skb/ingress" in str(e.value)


def test_not_an_object(tmp_path):
    from bpfwall.kernel.elf import read_object
    from bpfwall.kernel.errors import KernelError

    path = tmp_path / "x.o"
    path.write_bytes(b"not an ELF file at all")
    with pytest.raises(KernelError, match="not a valid ELF"):
        read_object(str(path))
    with pytest.raises(KernelError, match="cannot read"):
        read_object(str(tmp_path / "missing.o"))


def test_btf_load_error_carries_the_log(obj):
    from bpfwall.kernel import btf
    from bpfwall.kernel.errors import VerifierError

    blob = bytearray(obj.btf)
    hdr = btf.parse(obj.btf).header
    types_start = hdr[3] + hdr[4]
    struct.pack_into("=I", blob, types_start + 4, 31 << 24)  # type 1 gets kind 31: no such kind
    with pytest.raises(VerifierError) as e:
        btf.btf_load(bytes(blob))
    assert e.value.log and "BTF" in str(e.value)


# -- loading ----------------------------------------------------------------------

def test_load_creates_maps_with_btf(obj):
    from bpfwall.kernel import loader, maps, progs

    with loader.load(obj) as loaded:
        assert set(loaded.maps) == set(obj.maps)
        infos = {name: maps.map_info(fd) for name, fd in loaded.maps.items()}
        for name, info in infos.items():
            d = obj.maps[name]
            assert (info.name, info.type, info.key_size, info.value_size, info.max_entries, info.flags) == (
                name, d.type, d.key_size, d.value_size, d.max_entries, d.flags)
            assert info.btf_id != 0
            assert loader.map_compatible(loaded.maps[name], d)
        for section, fd in loaded.progs.items():
            info = progs.prog_info(fd)
            assert info.name == obj.programs[section].name
            assert set(info.map_ids) == {i.id for i in infos.values()}
            assert info.btf_id != 0 and len(info.tag) == 16 and info.xlated_size > 0
            # the id walk and fd-by-id find it
            ids, cur = [], 0
            while (cur := progs.prog_get_next_id(cur)) is not None:
                ids.append(cur)
            assert info.id in ids
            again = progs.prog_get_fd_by_id(info.id)
            try:
                assert progs.prog_info(again).id == info.id
            finally:
                os.close(again)


def test_load_reuses_maps(obj):
    from bpfwall.kernel import loader, maps, progs

    d = obj.maps["kt_counters"]
    fd = maps.map_create(d.type, d.key_size, d.value_size, d.max_entries, d.flags, "kt_kept")
    try:
        with loader.load(obj, reuse={"kt_counters": fd}) as loaded:
            assert loaded.maps["kt_counters"] == fd
            kept = maps.map_info(fd).id
            for prog_fd in loaded.progs.values():
                assert kept in progs.prog_info(prog_fd).map_ids
        assert maps.map_info(fd).name == "kt_kept"  # close() left the reused fd open
    finally:
        os.close(fd)


def test_load_refuses_incompatible_reuse(obj):
    from bpfwall.kernel import loader, maps, syscall as sc
    from bpfwall.kernel.errors import KernelError

    fd = maps.map_create(sc.BPF_MAP_TYPE_ARRAY, 4, 16, 4, name="kt_wrong")
    try:
        assert not loader.map_compatible(fd, obj.maps["kt_counters"])
        with pytest.raises(KernelError, match="'kt_counters'"):
            loader.load(obj, reuse={"kt_counters": fd})
        maps.map_info(fd)  # still ours, still open
    finally:
        os.close(fd)


def test_verifier_error_carries_the_log_and_nothing_leaks(objects):
    """kernel_test_bad: the map and the ingress program load, egress is refused;
    the fixture checks that the map and ingress program were closed again."""
    from bpfwall.kernel import loader
    from bpfwall.kernel.elf import read_object
    from bpfwall.kernel.errors import KernelError, VerifierError

    with pytest.raises(VerifierError) as e:
        loader.load(read_object(objects["kernel_test_bad"]))
    err = e.value
    assert isinstance(err, KernelError) and err.errno == errno.EACCES
    assert "invalid access to packet" in err.log
    msg = str(err)
    assert "\n" not in msg
    assert "cgroup_skb/egress" in msg and "'kt_bad'" in msg
    assert "outside of the packet" in msg and "kernel_test_bad.c:" in msg


def test_verifier_log_buffer_grows_until_the_log_fits(objects, monkeypatch):
    from bpfwall.kernel import loader, progs
    from bpfwall.kernel.elf import read_object
    from bpfwall.kernel.errors import VerifierError

    monkeypatch.setattr(progs, "_LOG_START", 64)  # far too small: the kernel answers ENOSPC
    with pytest.raises(VerifierError) as e:
        loader.load(read_object(objects["kernel_test_bad"]))
    assert e.value.errno == errno.EACCES
    assert "invalid access to packet" in e.value.log and e.value.log.startswith("0: R1=ctx()")  # all of it


def test_unknown_section_is_refused(obj):
    from bpfwall.kernel import loader
    from bpfwall.kernel.elf import BpfObject
    from bpfwall.kernel.errors import KernelError

    prog = obj.programs["cgroup_skb/ingress"]
    odd = BpfObject(obj.maps, {"xdp": prog}, obj.license, obj.btf)
    with pytest.raises(KernelError, match="program section xdp"):
        loader.load(odd)


# -- running and maps ---------------------------------------------------------------

def counters(fd: int, index: int) -> list[tuple[int, int]]:
    """Per-CPU (packets, bytes) of one counter slot."""
    from bpfwall.kernel import maps, syscall as sc

    raw = maps.map_lookup(fd, struct.pack("=I", index), maps.percpu_value_size(16))
    assert len(raw) == 16 * sc.possible_cpus()
    return [struct.unpack_from("=QQ", raw, off) for off in range(0, len(raw), 16)]


def test_test_run_verdicts_and_percpu_counters(obj):
    from bpfwall.kernel import loader, progs

    with loader.load(obj) as loaded:
        ingress, egress = loaded.progs["cgroup_skb/ingress"], loaded.progs["cgroup_skb/egress"]
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_UDP))[0] == 1
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_TCP))[0] == 0
        assert progs.prog_test_run(ingress, ETH_IP6 + ipv6(IPPROTO_UDP))[0] == 0  # IPv4 only
        retval, duration = progs.prog_test_run(egress, ETH_IP + ipv4(IPPROTO_UDP), repeat=50)
        assert retval == 1 and duration >= 0
        # index = direction * 2 + dropped; bytes are skb->len, the L3 packet
        fd = loaded.maps["kt_counters"]
        assert sum(p for p, _ in counters(fd, 0)) == 1            # ingress passed
        assert sum(p for p, _ in counters(fd, 1)) == 2            # ingress dropped
        assert [sum(x) for x in zip(*counters(fd, 2), strict=False)] == [50, 50 * 28]  # egress passed


def test_hash_update_lookup_delete_iterate(obj):
    from bpfwall.kernel import loader, maps, progs, syscall as sc
    from bpfwall.kernel.errors import KernelError

    with loader.load(obj) as loaded:
        fd = loaded.maps["kt_ports"]
        keys = [struct.pack("=I", p) for p in (53, 80, 443)]
        for k in keys:
            maps.map_update(fd, k, b"\1")
        assert sorted(maps.map_keys(fd, 4)) == sorted(keys)
        assert maps.map_lookup(fd, keys[0], 1) == b"\1"
        assert maps.map_lookup(fd, struct.pack("=I", 9), 1) is None
        with pytest.raises(KernelError) as e:
            maps.map_update(fd, keys[0], b"\2", sc.BPF_NOEXIST)
        assert e.value.errno == errno.EEXIST
        assert maps.map_delete(fd, keys[0]) is True
        assert maps.map_delete(fd, keys[0]) is False
        assert sorted(maps.map_keys(fd, 4)) == sorted(keys[1:])
        # the program sees the map: port key 0 present → drop
        ingress = loaded.progs["cgroup_skb/ingress"]
        maps.map_update(fd, struct.pack("=I", 0), b"\1")
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_UDP))[0] == 0
        info = maps.map_info(fd)
        assert (info.name, info.key_size, info.value_size) == ("kt_ports", 4, 1)


def test_lpm_trie(obj):
    from bpfwall.kernel import loader, maps, progs

    with loader.load(obj) as loaded:
        fd, ingress = loaded.maps["kt_nets"], loaded.progs["cgroup_skb/ingress"]
        maps.map_update(fd, addr_key("10.0.0.0/8"), b"\1")
        maps.map_update(fd, addr_key("2001:db8::/32"), b"\2")
        assert len(addr_key("10.0.0.0/8")) == 21
        # longest-prefix lookups; families never mix
        assert maps.map_lookup(fd, addr_key("10.9.8.7/32"), 1) == b"\1"
        assert maps.map_lookup(fd, addr_key("11.0.0.1/32"), 1) is None
        assert maps.map_lookup(fd, addr_key("2001:db8:1::1/128"), 1) == b"\2"
        assert maps.map_lookup(fd, addr_key("::a00:1/128"), 1) is None
        assert sorted(maps.map_keys(fd, 21)) == sorted([addr_key("10.0.0.0/8"), addr_key("2001:db8::/32")])
        # the program drops packets to a listed network
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_UDP, daddr="10.1.2.3"))[0] == 0
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_UDP, daddr="11.1.2.3"))[0] == 1
        assert maps.map_delete(fd, addr_key("10.0.0.0/8"))
        assert not maps.map_delete(fd, addr_key("10.0.0.0/8"))
        assert progs.prog_test_run(ingress, ETH_IP + ipv4(IPPROTO_UDP, daddr="10.1.2.3"))[0] == 1


def test_possible_cpus():
    from bpfwall.kernel import syscall as sc

    assert sc.possible_cpus() >= len(os.sched_getaffinity(0))


# -- Map and Program objects ----------------------------------------------------------

def test_map_reads_its_info_once_and_offers_every_operation(obj, monkeypatch):
    from bpfwall.kernel import loader, maps, syscall as sc
    from bpfwall.kernel.errors import KernelError

    with loader.load(obj) as loaded:
        calls = []
        real = maps.map_info
        monkeypatch.setattr(maps, "map_info", lambda fd: calls.append(fd) or real(fd))
        ports = maps.Map(loaded.maps["kt_ports"])  # borrowed: the Loaded closes the fd
        keys = [struct.pack("=I", p) for p in (53, 80, 443)]
        for i, k in enumerate(keys):
            ports.update(k, bytes([i + 1]))
        assert sorted(ports.keys()) == sorted(keys) == sorted(ports)
        assert dict(ports.items()) == {k: bytes([i + 1]) for i, k in enumerate(keys)}
        assert ports.lookup(keys[1]) == b"\2" and ports.lookup(struct.pack("=I", 9)) is None
        with pytest.raises(KernelError) as e:
            ports.update(keys[0], b"\7", sc.BPF_NOEXIST)
        assert e.value.errno == errno.EEXIST
        assert ports.delete(keys[0]) is True and ports.delete(keys[0]) is False
        assert (ports.info.name, ports.info.key_size, ports.info.value_size) == ("kt_ports", 4, 1)
        assert calls == [loaded.maps["kt_ports"]]  # one BPF_OBJ_GET_INFO_BY_FD for all of it
        with pytest.raises(ValueError, match="not a per-CPU map"):
            ports.lookup_percpu(keys[1])
        ports.close()
        assert maps.map_info(loaded.maps["kt_ports"]).name == "kt_ports"  # the owner's fd is still open


def test_map_per_cpu_values(obj):
    from bpfwall.kernel import loader, maps, progs, syscall as sc

    with loader.load(obj) as loaded:
        counters = maps.Map(loaded.maps["kt_counters"])
        assert counters.percpu and counters.value_buffer_size == 16 * sc.possible_cpus()
        slot = struct.pack("=I", 2)  # egress passed
        assert counters.lookup_percpu(slot) == [bytes(16)] * sc.possible_cpus()
        progs.prog_test_run(loaded.progs["cgroup_skb/egress"], ETH_IP + ipv4(IPPROTO_UDP), repeat=7)
        per_cpu = [struct.unpack("=QQ", v) for v in counters.lookup_percpu(slot)]
        assert len(per_cpu) == sc.possible_cpus() and [sum(x) for x in zip(*per_cpu, strict=True)] == [7, 7 * 28]
        values = [struct.pack("=QQ", cpu, 100 * cpu) for cpu in range(sc.possible_cpus())]
        counters.update_percpu(slot, values)
        assert counters.lookup_percpu(slot) == values
        assert counters.lookup(slot) == b"".join(values)  # the kernel's whole buffer
        with pytest.raises(ValueError, match="values of 16 bytes"):
            counters.update_percpu(slot, values[:-1] + [b"short"])


def test_owned_map_and_program_close_their_fds(obj):
    from bpfwall.kernel import loader, maps, progs, syscall as sc
    from bpfwall.kernel.fd import Fd

    fds = bpf_fds()
    with maps.Map.create(sc.BPF_MAP_TYPE_ARRAY, 4, 8, 2, name="kt_owned") as m:
        m.update(struct.pack("=I", 1), struct.pack("=Q", 42))
        with maps.Map.from_id(m.info.id) as again:
            assert again.fileno() != m.fileno()
            assert again.lookup(struct.pack("=I", 1)) == struct.pack("=Q", 42)
        assert bpf_fds() == fds + 1
    assert bpf_fds() == fds
    m.close()  # again: nothing
    with loader.load(obj) as loaded:
        borrowed = progs.Program(loaded.progs["cgroup_skb/ingress"])
        assert borrowed.info.name == "kt_ingress"
        with progs.Program.from_id(borrowed.id) as p:
            assert p.id == borrowed.id and p.fd.owned
            assert p.test_run(ETH_IP + ipv4(IPPROTO_UDP))[0] == 1
            assert p.test_run(ETH_IP + ipv4(IPPROTO_TCP))[0] == 0
            assert p.read_info().run_cnt >= 0
        borrowed.close()
        assert progs.prog_info(loaded.progs["cgroup_skb/ingress"]).name == "kt_ingress"
        assert isinstance(borrowed.fd, Fd) and not borrowed.fd.owned
