"""The contract with bpf/port_filter.c: Python's side checked against clang's (no root needed).

A probe that includes port_filter.c (with the generated header of a real unit) is compiled
exactly as bpfwall compiles the program; the object's BTF then describes every map's key and
value types, and an enum in the probe carries each constant the Python side relies on. Every
ctypes layout (size, member names, offsets) and every value of program_contract must match.
"""
from __future__ import annotations

import ctypes
import ipaddress
import shutil
import struct
import subprocess

import pytest

from bpfwall import build
from bpfwall import program_contract as pc
from bpfwall.kernel import btf as btf_mod
from bpfwall.lang.checker import analyze
from bpfwall.lower.c import param_member

# -- encodings, without the compiler ----------------------------------------------

def test_number_key_is_a_native_u32():
    assert pc.number_key(0x01020304) == struct.pack("=I", 0x01020304)
    assert pc.value_of("number", pc.number_key(65535)) == 65535


@pytest.mark.parametrize("net", ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.7/32", "::/0", "2001:db8::/32",
                                 "::1/128", "::ffff:10.0.0.0/104"])
def test_address_key_round_trip(net):
    n = ipaddress.ip_network(net)
    key = pc.address_key(n)
    assert len(key) == ctypes.sizeof(pc.AddrKey) == 21
    k = pc.AddrKey.from_buffer_copy(key)
    assert (k.prefixlen, k.family) == (pc.FAMILY_BITS + n.prefixlen, n.version)
    assert bytes(k.addr) == n.network_address.packed.ljust(16, b"\0")
    assert pc.value_of("address", key) == n


def test_v4_and_v6_keys_never_collide():
    # ::a00:0/104 and 10.0.0.0/8 hold the same address bytes; the family byte keeps them apart
    assert pc.address_key(ipaddress.ip_network("10.0.0.0/8")) != pc.address_key(ipaddress.ip_network("::a00:0/104"))


def test_params_in_name_order():
    names = ["a", "max", "z"]
    raw = pc.encode_params(names, {"z": 3, "a": 1})
    assert len(raw) == 8 * 3 and raw[16:] == bytes(ctypes.c_uint64(3))
    assert pc.decode_params(names, raw) == {"a": 1, "max": 0, "z": 3}
    assert ctypes.sizeof(pc.params_type(0)) == 8  # the C struct's unused member


def test_mode_as_the_program_reads_it():
    assert [pc.mode_name(pc.mode_value(m)) for m in pc.MODES] == list(pc.MODES)
    # the program lets drops through only for MODE_AUDIT: any other value enforces
    assert pc.mode_name(bytes(ctypes.c_uint32(7))) == "enforce"


def test_counter_slots_and_sums():
    slots = {(d, dropped): pc.counter_slot(d, dropped) for d in pc.DIRECTIONS for dropped in (False, True)}
    assert sorted(slots.values()) == list(range(pc.COUNTER_SLOTS))
    total = pc.sum_counters([bytes(pc.Counter(1, 100)), bytes(pc.Counter(2, 50))])
    assert (total.packets, total.bytes) == (3, 150)
    assert (pc.sum_counters([]).packets, pc.sum_counters([]).bytes) == (0, 0)


def test_meta_size_leaves_room_for_a_nul():
    for n in (0, 1, 255, 256, 1000):
        size = pc.meta_size(n)
        assert size > n and size % pc.META_STEP == 0 and size - n <= pc.META_STEP
    raw = pc.encode_meta(b'{"a": 1}', 256)
    assert len(raw) == 256 and pc.decode_meta(raw) == b'{"a": 1}'


# -- the C side, compiled ---------------------------------------------------------

# Two units: one with params and a set of each kind (a C keyword among the params), and one
# with neither (the params struct then holds its unused member).
PROGRAMS = {
    "params-and-sets": ("dst_port in @ports || saddr in @nets || len > $max || dst_port == $int",
                        "remote_port == $lo"),
    "plain": ("tcp", None),
    "interfaces": ('ifname in {"wg0", "wlan*"} || udp', 'ifname != "lo"'),
    "strict-slice-default": ("udp && remote_port == $dns", "false"),  # a slice's guard: the guard map too
}


def _unit(ingress: str, egress: str | None, name: str = "") -> build.UnitProgram:
    slice_default = name.endswith("slice-default")
    return build.UnitProgram(analyze(ingress), analyze(egress) if egress else None, set_capacity=77,
                             slice_default=slice_default, strict=name.startswith("strict"))


def _constants(program: build.UnitProgram) -> dict[str, int]:
    """C expression → the value Python holds for it."""
    out = {f"DIR_{d.upper()}": pc.DIRECTIONS.index(d) for d in pc.DIRECTIONS}
    out.update({f"MODE_{m.upper()}": pc.MODES.index(m) for m in pc.MODES})
    for d in pc.DIRECTIONS:
        for dropped in (False, True):
            out[f"COUNTER_SLOT(DIR_{d.upper()}, {int(dropped)})"] = pc.counter_slot(d, dropped)
    for net in ("0.0.0.0/0", "10.0.0.0/8", "192.0.2.1/32", "::/0", "2001:db8::/32", "::1/128"):
        n = ipaddress.ip_network(net)
        out[f"ADDR_KEY_PREFIXLEN({n.prefixlen})"] = pc.AddrKey.from_buffer_copy(pc.address_key(n)).prefixlen
    out["BPFWALL_META_SIZE"] = pc.meta_size(len(program.meta_bytes()))
    out["BPFWALL_HAS_PARAMS"] = int(bool(program.params))
    out["BPFWALL_HAS_IFNAME"] = int(bool(program.interfaces))
    if program.slice_default:
        out.update({"GUARD_SLOTS": pc.GUARD_SLOTS, "GUARD_CAPACITY": pc.GUARD_CAPACITY,
                    "GUARD_CLASSIFIED": pc.GUARD_CLASSIFIED, "sizeof(struct guard_slot)": ctypes.sizeof(pc.GuardSlot),
                    **{f"GUARD_BELOW(DIR_{d.upper()})": pc.guard_below(d) for d in pc.DIRECTIONS}})
    return out


PROBE = """/* bpfwall's contract probe: port_filter.c as bpfwall compiles it, and each constant the
 * Python side relies on as an enumerator, so that the object's BTF carries them all. */
#include "{source}"

enum bpfwall_probe {{
{enumerators}
}};

struct {{
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, enum bpfwall_probe);
}} bpfwall_probe SEC(".maps");
"""


def compile_probe(program: build.UnitProgram, constants: list[str], tmp_path):
    """(map definitions, parsed BTF, [value of each constant]) of the compiled probe."""
    from bpfwall.kernel.elf import read_object

    (tmp_path / "bpfwall_filter.h").write_text(program.header())
    probe = tmp_path / "probe.c"
    probe.write_text(PROBE.format(source=build.source_dir().resolve() / "port_filter.c",
                                  enumerators="\n".join(f"\tprobe_{i} = ({c})," for i, c in enumerate(constants))))
    out = tmp_path / "probe.o"
    proc = subprocess.run(build.compile_command(program, probe, str(tmp_path), out), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    obj = read_object(str(out))
    btf = btf_mod.parse(obj.btf)
    enum = btf.resolve(obj.maps.pop("bpfwall_probe").btf_value_type_id)
    values = dict(enum.enumerators)
    return obj.maps, btf, [values[f"probe_{i}"] for i in range(len(constants))]


def btf_layout(btf: btf_mod.Btf, type_id: int):
    """A type as (kind, size or count, parts) from BTF, comparable with ctypes_layout()."""
    t = btf.resolve(type_id)
    if t.kind in (btf_mod.KIND_INT, btf_mod.KIND_ENUM):
        return ("int", t.size)
    if t.kind == btf_mod.KIND_ARRAY:
        return ("array", t.array[1], btf_layout(btf, t.array[0]))
    if t.kind == btf_mod.KIND_STRUCT:
        assert all(bit % 8 == 0 for _, _, bit in t.members), "no bitfields in shared structs"
        return ("struct", t.size, tuple((name, bit // 8, btf_layout(btf, m)) for name, m, bit in t.members))
    raise AssertionError(f"BTF kind {t.kind} in a shared type")


def ctypes_layout(t):
    if issubclass(t, ctypes.Structure):
        return ("struct", ctypes.sizeof(t),
                tuple((name, getattr(t, name).offset, ctypes_layout(ft)) for name, ft, *_ in t._fields_))
    if issubclass(t, ctypes.Array):
        return ("array", t._length_, ctypes_layout(t._type_))
    return ("int", ctypes.sizeof(t))


def params_layout(names: list[str]):
    """Python's params (u64 slots in name order) as the C struct lower/c.py declares for them."""
    slots = pc.params_type(len(names))
    slot = ctypes.sizeof(slots._type_)
    return ("struct", ctypes.sizeof(slots),
            tuple((param_member(n), i * slot, ctypes_layout(slots._type_)) for i, n in enumerate(names))
            or (("_unused", 0, ctypes_layout(slots._type_)),))


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
@pytest.mark.parametrize("name", PROGRAMS)
def test_python_and_c_agree(tmp_path, name):
    program = _unit(*PROGRAMS[name], name)
    expected = _constants(program)
    mapdefs, btf, values = compile_probe(program, list(expected), tmp_path)

    wrong = {c: f"C {got}, Python {expected[c]}" for c, got in zip(expected, values, strict=True) if got != expected[c]}
    assert not wrong, wrong

    shapes = pc.map_shapes(program.params, program.sets, len(program.meta_bytes()), program.set_capacity,
                           program.slice_default, bool(program.interfaces))
    assert sorted(mapdefs) == sorted(shapes)
    for map_name, shape in shapes.items():
        d = mapdefs[map_name]
        c_def = (d.type, d.max_entries, d.flags, d.key_size, d.value_size)
        py_def = (shape.type, shape.max_entries, shape.flags, _sizeof(shape.key), _sizeof(shape.value))
        assert c_def == py_def, f"map {map_name} (type, max_entries, flags, key size, value size)"
        if shape.key is None:  # a ring buffer: its records are checked below
            continue
        for part, type_id, py in (("key", d.btf_key_type_id, ctypes_layout(shape.key)),
                                  ("value", d.btf_value_type_id, params_layout(program.params)
                                   if map_name == pc.PARAMS else ctypes_layout(shape.value))):
            c = btf_layout(btf, type_id)
            assert c == py, f"map {map_name}, {part}: C {c} ≠ Python {py}"


def _sizeof(t) -> int:
    return 0 if t is None else ctypes.sizeof(t)


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang not installed")
def test_event_record_and_limits_agree(tmp_path):
    """The ring's record (no map declares its type: offsetof/sizeof of each member) and the
    event constants."""
    program = _unit(*PROGRAMS["plain"])
    constants = {"EVENTS_RING_BYTES": pc.EVENTS_RING_BYTES, "NO_PROTO": pc.NO_PROTO,
                 "LOG_LIMIT_MAX": pc.LOG_LIMIT_MAX, "WAKE_EVERY_NS": pc.WAKE_EVERY_NS,
                 "sizeof(struct bpfwall_event)": ctypes.sizeof(pc.Event)}
    for name, *_ in pc.Event._fields_:
        constants[f"__builtin_offsetof(struct bpfwall_event, {name})"] = getattr(pc.Event, name).offset
        constants[f"sizeof(((struct bpfwall_event *)0)->{name})"] = getattr(pc.Event, name).size
    _, _, values = compile_probe(program, list(constants), tmp_path)
    assert dict(zip(constants, values, strict=True)) == constants


def test_interface_bits_and_keys():
    patterns = ["eth0", "lo", "wlan*"]
    assert [pc.iface_bits(patterns, n) for n in ("lo", "wlan0", "wlan", "eth0", "eth01", "wg0")] == [2, 4, 4, 1, 0, 0]
    key = pc.IfaceKey.from_buffer_copy(pc.iface_key(7, 3))
    assert (key.netns, key.ifindex, key.pad) == (7, 3, 0) and ctypes.sizeof(pc.IfaceKey) == 16


def test_guard_entries_round_trip():
    assert pc.GUARD_SLOTS & (pc.GUARD_SLOTS - 1) == 0  # the program masks the id's low bits
    assert pc.guard_index(pc.GUARD_SLOTS + 3) == pc.guard_index(3) == pc.number_key(3)
    assert pc.decode_guard_slot(pc.guard_slot(2**40 + 9, ["ingress"])) == (2**40 + 9, {"ingress"})
    assert pc.decode_guard_slot(pc.FREE_SLOT) == (0, set())
    assert len(pc.guard_key(7)) == 8 and len(pc.guard_value([])) == 4
    assert pc.decode_guard(pc.guard_key(2**40 + 3), pc.guard_value(["egress"])) == (2**40 + 3, {"egress"})
    assert pc.decode_guard(pc.guard_key(5), pc.guard_value(pc.DIRECTIONS)) == (5, set(pc.DIRECTIONS))
    assert pc.decode_guard(pc.guard_key(5), pc.guard_value([])) == (5, set())


def test_log_limit_value_round_trip():
    raw = pc.log_limit_value(100, 200)
    assert len(raw) == ctypes.sizeof(pc.LogLimit) == 56
    assert pc.decode_log_limit(raw) == (100, 200)
    v = pc.LogLimit.from_buffer_copy(pc.log_limit_value(3, 5))
    assert (v.interval_ns, v.tolerance_ns, v.tat) == (333_333_334, 4 * 333_333_334, 0)  # rounded up: ≤ 3 a second
    assert v.jiffy_ns == pc.JIFFY_NS and 1_000_000 <= pc.JIFFY_NS <= 10_000_000  # HZ 100..1000
    assert pc.clock_offset_ns(raw) == (0, 0)
    assert pc.LogLimit.from_buffer_copy(pc.log_limit_value(0, 5)).interval_ns == 0
    # a unit loaded before the GCRA still has the spin-lock layout pinned
    assert pc.decode_log_limit(struct.pack("=IIQQQ", 0, 7, 9, 0, 0)) == (7, 9)
    assert pc.sum_lost([bytes(pc.Lost(3)), bytes(pc.Lost(4))]) == 7


def test_the_probe_sees_a_change_on_either_side(tmp_path):
    """The check itself can fail: a C side that differs from the Python side is seen."""
    program = _unit(*PROGRAMS["params-and-sets"])
    mapdefs, btf, values = compile_probe(program, ["MODE_AUDIT", "COUNTER_SLOT(DIR_EGRESS, 1)"], tmp_path)
    assert values == [1, 3]
    counter = btf_layout(btf, mapdefs[pc.COUNTERS].btf_value_type_id)

    class Swapped(ctypes.Structure):
        _fields_ = [("bytes", ctypes.c_uint64), ("packets", ctypes.c_uint64)]

    class Narrow(ctypes.Structure):
        _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint32)]

    assert counter == ctypes_layout(pc.Counter)
    assert counter != ctypes_layout(Swapped) and counter != ctypes_layout(Narrow)

    class Unpacked(ctypes.Structure):  # the C struct is packed: 21 bytes, addr at 5
        _fields_ = pc.AddrKey._fields_

    trie = mapdefs[pc.set_map("nets")]
    assert btf_layout(btf, trie.btf_key_type_id) != ctypes_layout(Unpacked)
