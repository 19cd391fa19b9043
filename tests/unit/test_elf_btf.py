"""The ELF reader and the BTF parser on a checked-in object (tests/unit/data/port_filter.o, made
by make_port_filter_o.py beside it with bpfwall's own build): no clang, no root, no kernel."""
from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from bpfwall import build
from bpfwall.kernel import btf
from bpfwall.kernel.elf import LD_IMM64, read_object
from bpfwall.kernel.errors import KernelError
from bpfwall.lang.checker import analyze_pair
from tests.unit.data.make_port_filter_o import EGRESS, INGRESS, SET_CAPACITY

OBJECT = Path(__file__).parent / "data" / "port_filter.o"

# include/uapi/linux/bpf.h
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_LPM_TRIE = 1, 2, 6, 11
BPF_F_NO_PREALLOC = 1


@pytest.fixture(scope="module")
def obj():
    return read_object(str(OBJECT))


@pytest.fixture(scope="module")
def elf_sections() -> dict[str, bytes]:
    with open(OBJECT, "rb") as f:
        return {s.name: s.data() for s in ELFFile(f).iter_sections()}


def test_maps_are_the_ones_port_filter_c_and_the_header_declare(obj):
    meta_size = build.UnitProgram(*analyze_pair(INGRESS, EGRESS), set_capacity=SET_CAPACITY).meta_size()
    got = {name: (m.type, m.key_size, m.value_size, m.max_entries, m.flags) for name, m in obj.maps.items()}
    assert got == {
        "counters": (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 16, 4, 0),     # 2 directions × pass/drop, {packets, bytes}
        "mode": (BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0),
        "meta": (BPF_MAP_TYPE_ARRAY, 4, meta_size, 1, 0),
        "params": (BPF_MAP_TYPE_ARRAY, 4, 8, 1, 0),                # one u64: $dns
        "set_web": (BPF_MAP_TYPE_HASH, 4, 1, SET_CAPACITY, 0),
        "set_admins": (BPF_MAP_TYPE_LPM_TRIE, 21, 1, SET_CAPACITY, BPF_F_NO_PREALLOC),  # packed prefixlen+family+addr
    }
    assert obj.license == "GPL"


def test_map_btf_ids_name_types_of_their_sizes(obj):
    b = btf.parse(obj.btf)
    for m in obj.maps.values():
        assert b.size(m.btf_key_type_id) == m.key_size and b.size(m.btf_value_type_id) == m.value_size, m.name
    assert b.resolve(obj.maps["counters"].btf_value_type_id).name == "bpfwall_counter"
    assert b.resolve(obj.maps["set_admins"].btf_key_type_id).name == "bpfwall_addr_key"
    counter = b.resolve(obj.maps["counters"].btf_value_type_id)
    assert [(name, bit_offset) for name, _, bit_offset in counter.members] == [("packets", 0), ("bytes", 64)]


def test_programs_and_their_map_relocations(obj):
    assert {s: p.name for s, p in obj.programs.items()} == {"cgroup_skb/ingress": "bpfwall_ingress",
                                                         "cgroup_skb/egress": "bpfwall_egress"}
    used = {}
    for section, prog in obj.programs.items():
        assert len(prog.insns) % 8 == 0 and 0x95 in prog.insns[::8]  # whole instructions, BPF_EXIT among them
        for insn, name in prog.map_relocs:
            assert prog.insns[insn * 8] == LD_IMM64 and name in obj.maps
        used[section] = {name for _, name in prog.map_relocs}
    assert used["cgroup_skb/ingress"] == {"counters", "mode", "params", "set_web", "set_admins"}
    assert used["cgroup_skb/egress"] == {"counters", "mode", "params"}  # run() reads params in both; no sets


def test_func_and_line_info_are_in_instructions_not_bytes(obj):
    b = btf.parse(obj.btf)
    for prog in obj.programs.values():
        count = len(prog.insns) // 8
        (insn, type_id), = struct.iter_unpack("=II", prog.func_info)  # one function per section
        func = b.types[type_id]
        assert (insn, func.kind, func.name) == (0, btf.KIND_FUNC, prog.name)
        offsets = [rec[0] for rec in struct.iter_unpack("=IIII", prog.line_info)]
        assert offsets and offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < count


def test_fixup_fills_the_maps_datasec_as_libbpf_does(obj, elf_sections):
    raw = btf.parse(elf_sections[".BTF"])
    assert raw.datasec(".maps").size == 0  # clang leaves it to the loader; the kernel refuses 0
    fixed = btf.parse(obj.btf)
    sec = fixed.datasec(".maps")
    assert sec.size == len(elf_sections[".maps"])
    names = [fixed.types[var].name for var, _, _ in sec.secinfo]
    offsets = [off for _, off, _ in sec.secinfo]
    assert sorted(names) == sorted(obj.maps) and offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(off + size <= sec.size for _, off, size in sec.secinfo)
    assert len(obj.btf) == len(elf_sections[".BTF"])  # patched in place, nothing added


def test_ext_info_sections_match_the_programs(obj, elf_sections):
    info = btf.ext_info(elf_sections[".BTF.ext"], btf.parse(obj.btf))
    assert set(info) == set(obj.programs)


@pytest.mark.parametrize("damage,message", [
    (lambda blob: blob[:10], "shorter than its header"),
    (lambda blob: b"\x9f\xea" + blob[2:], "magic 0xea9f"),                       # byte-swapped: other-endian BTF
    (lambda blob: blob[:-1], "sections run past the end"),
], ids=["short", "magic", "truncated"])
def test_damaged_btf_is_one_error(obj, damage, message):
    with pytest.raises(KernelError, match=f"^malformed BTF: .*{message}") as e:
        btf.parse(damage(obj.btf))
    assert e.value.errno == errno.EINVAL


def test_an_unknown_btf_kind_is_refused(obj):
    b = btf.parse(obj.btf)
    blob = bytearray(obj.btf)
    types_start = b.header[3] + b.header[4]
    info_at = types_start + b.types[1].offset + 4
    struct.pack_into("=I", blob, info_at, struct.unpack_from("=I", blob, info_at)[0] | (31 << 24))
    with pytest.raises(KernelError, match="^malformed BTF: type 1 has unknown kind 31$"):
        btf.parse(bytes(blob))


@pytest.mark.parametrize("damage,message", [
    (lambda elf: b"not an ELF object at all", "not a valid ELF object"),
    (lambda elf: elf[:18] + struct.pack("<H", 62) + elf[20:], "not a 64-bit little-endian BPF object"),  # EM_X86_64
], ids=["garbage", "x86-64"])
def test_damaged_elf_is_one_error(tmp_path, damage, message):
    path = tmp_path / "o"
    path.write_bytes(damage(OBJECT.read_bytes()))
    with pytest.raises(KernelError, match=message) as e:
        read_object(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_object_is_one_error(tmp_path):
    with pytest.raises(KernelError, match="cannot read .*/missing.o") as e:
        read_object(str(tmp_path / "missing.o"))
    assert e.value.errno == errno.ENOENT


def test_a_subset_of_everything_reachable_is_the_same_btf(obj):
    """btf.subset (how a batch unit's BTF is cut out) rewrites every kind port_filter.o holds:
    from the programs' FUNCs and all of .maps, with no prefix, it keeps every type, renumbered
    in order, and every map still reads the same from it."""
    whole = btf.parse(obj.btf)
    funcs = [t.id for t in whole.types if t.kind == btf.KIND_FUNC]
    sub = btf.subset(obj.btf, funcs, "")
    cut = btf.parse(sub.blob)
    reachable = {t.id for t in whole.types[1:]}
    assert sorted(sub.ids) == [0, *sorted(reachable)] and len(cut.types) == len(whole.types)
    assert [(t.kind, t.name, t.vlen, t.size, t.members, t.array, t.enumerators) for t in cut.types] == \
        [(t.kind, t.name, t.vlen, t.size, [(n, sub.ids[i], o) for n, i, o in t.members],
          (sub.ids[t.array[0]], t.array[1]) if t.kind == btf.KIND_ARRAY else t.array, t.enumerators)
         for t in whole.types]
    assert btf.map_definitions(cut) == {
        name: {**d, "btf_key_type_id": sub.ids[d["btf_key_type_id"]], "btf_value_type_id": sub.ids[d["btf_value_type_id"]]}
        for name, d in btf.map_definitions(whole).items()}


def test_a_subset_by_prefix_keeps_one_units_maps_and_drops_the_prefix(obj):
    whole = btf.parse(obj.btf)
    sub = btf.parse(btf.subset(obj.btf, [], "coun").blob)  # "counters" is the one .maps variable kept
    assert list(btf.map_definitions(sub)) == ["ters"]
    assert btf.map_definitions(sub)["ters"]["value_size"] == btf.map_definitions(whole)["counters"]["value_size"]
