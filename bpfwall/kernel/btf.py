"""BTF: parse a blob, fix up an object's BTF for the kernel, load it, read map definitions.

Format (include/uapi/linux/btf.h): a header, a type section (records of
struct btf_type, each followed by kind-specific data; type ids count from 1
in order, 0 is void) and a string section (names are offsets into it).
"""
from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass, field

from . import syscall as sc
from .errors import KernelError, VerifierError

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("=HBBIIIII")  # magic version flags hdr_len type_off type_len str_off str_len
_TYPE = struct.Struct("=III")          # name_off info size|type

KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow struct btf_type: (fixed, per vlen item).
_TRAILER = {
    KIND_INT: (4, 0), KIND_PTR: (0, 0), KIND_ARRAY: (12, 0), KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12), KIND_ENUM: (0, 8), KIND_FWD: (0, 0), KIND_TYPEDEF: (0, 0),
    KIND_VOLATILE: (0, 0), KIND_CONST: (0, 0), KIND_RESTRICT: (0, 0), KIND_FUNC: (0, 0),
    KIND_FUNC_PROTO: (0, 8), KIND_VAR: (4, 0), KIND_DATASEC: (0, 12), KIND_FLOAT: (0, 0),
    KIND_DECL_TAG: (4, 0), KIND_TYPE_TAG: (0, 0), KIND_ENUM64: (0, 12),
}
_SIZED = {KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_DATASEC, KIND_FLOAT, KIND_ENUM64}
_MODIFIERS = {KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG}


@dataclass
class BtfType:
    id: int
    kind: int
    name: str
    vlen: int
    size: int = 0      # kinds in _SIZED
    type: int = 0      # the referenced type id, for the other kinds
    offset: int = 0    # of the record within the type section
    members: list[tuple[str, int, int]] = field(default_factory=list)   # STRUCT/UNION: name, type, bit offset
    secinfo: list[tuple[int, int, int]] = field(default_factory=list)   # DATASEC: var type, offset, size
    array: tuple[int, int] = (0, 0)  # ARRAY: element type, count
    enumerators: list[tuple[str, int]] = field(default_factory=list)    # ENUM/ENUM64: name, value


@dataclass
class Btf:
    header: tuple
    types: list[BtfType]  # index = type id; [0] is void
    strings: bytes

    def name(self, off: int) -> str:
        end = self.strings.index(b"\0", off)
        return self.strings[off:end].decode()

    def resolve(self, type_id: int) -> BtfType:
        """The type behind typedefs and qualifiers."""
        t = self.types[type_id]
        while t.kind in _MODIFIERS:
            t = self.types[t.type]
        return t

    def size(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t.kind in _SIZED:
            return t.size
        if t.kind == KIND_PTR:
            return 8
        if t.kind == KIND_ARRAY:
            return self.size(t.array[0]) * t.array[1]
        raise KernelError(errno.EINVAL, f"BTF type {type_id} ({t.name or 'anonymous'}) has no size")

    def datasec(self, name: str) -> BtfType | None:
        return next((t for t in self.types if t.kind == KIND_DATASEC and t.name == name), None)


def _bad(what: str) -> KernelError:
    return KernelError(errno.EINVAL, f"malformed BTF: {what}")


def parse(blob: bytes) -> Btf:
    if len(blob) < _HEADER.size:
        raise _bad("shorter than its header")
    header = _HEADER.unpack_from(blob)
    magic, version, _, hdr_len, type_off, type_len, str_off, str_len = header
    if magic != BTF_MAGIC or version != 1:
        raise _bad(f"magic {magic:#x} version {version} (not native-endian BTF v1)")
    types_raw = blob[hdr_len + type_off:hdr_len + type_off + type_len]
    strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
    if len(types_raw) != type_len or len(strings) != str_len:
        raise _bad("sections run past the end")
    btf = Btf(header, [BtfType(0, 0, "", 0)], strings)
    pos = 0
    while pos < type_len:
        name_off, info, size_or_type = _TYPE.unpack_from(types_raw, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind not in _TRAILER:
            raise _bad(f"type {len(btf.types)} has unknown kind {kind}")
        t = BtfType(len(btf.types), kind, btf.name(name_off), vlen, offset=pos)
        if kind in _SIZED:
            t.size = size_or_type
        else:
            t.type = size_or_type
        body = pos + _TYPE.size
        if kind in (KIND_STRUCT, KIND_UNION):
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("=III", types_raw, body + 12 * i)
                bit_off = m_off & 0xFFFFFF if info >> 31 else m_off  # kind_flag: bitfield size in the top byte
                t.members.append((btf.name(m_name), m_type, bit_off))
        elif kind == KIND_DATASEC:
            t.secinfo = [struct.unpack_from("=III", types_raw, body + 12 * i) for i in range(vlen)]
        elif kind == KIND_ARRAY:
            elem, _, nelems = struct.unpack_from("=III", types_raw, body)
            t.array = (elem, nelems)
        elif kind in (KIND_ENUM, KIND_ENUM64):
            signed = info >> 31  # kind_flag: the values are signed
            for i in range(vlen):
                if kind == KIND_ENUM:
                    e_name, value = struct.unpack_from("=Ii" if signed else "=II", types_raw, body + 8 * i)
                else:
                    e_name, lo, hi = struct.unpack_from("=III", types_raw, body + 12 * i)
                    value = hi << 32 | lo
                    if signed and value >> 63:
                        value -= 1 << 64
                t.enumerators.append((btf.name(e_name), value))
        fixed, per_item = _TRAILER[kind]
        pos = body + fixed + per_item * vlen
        btf.types.append(t)
    return btf


def fixup_object_btf(blob: bytes, section_sizes: dict[str, int], symbol_offsets: dict[str, int]) -> bytes:
    """The object's BTF as the kernel accepts it.

    clang cannot know where the linker will put things, so it leaves each
    DATASEC's size and its variables' offsets 0; the kernel refuses a DATASEC
    of size 0. Like libbpf, take them from the ELF section sizes and symbol
    values, and keep each DATASEC's variables sorted by offset. Every other
    kind clang emits is accepted as-is by the kernels bpfwall supports.
    """
    btf = parse(blob)
    out = bytearray(blob)
    types_start = btf.header[3] + btf.header[4]
    for t in btf.types:
        if t.kind != KIND_DATASEC or t.size:
            continue
        if t.name not in section_sizes:
            raise KernelError(errno.EINVAL, f"BTF DATASEC {t.name} has no ELF section")
        secinfo = []
        for var_type, _, size in t.secinfo:
            var = btf.types[var_type].name
            if var not in symbol_offsets:
                raise KernelError(errno.EINVAL, f"BTF variable {var!r} of {t.name} has no ELF symbol")
            secinfo.append((var_type, symbol_offsets[var], size))
        secinfo.sort(key=lambda s: s[1])
        rec = types_start + t.offset
        struct.pack_into("=I", out, rec + 8, section_sizes[t.name])
        for i, info in enumerate(secinfo):
            struct.pack_into("=III", out, rec + _TYPE.size + 12 * i, *info)
    return bytes(out)


def btf_load(blob: bytes) -> int:
    """Load BTF into the kernel; its fd. On failure the error carries the BTF verifier's log."""
    data = sc.buffer(blob)
    attr = sc.BtfLoadAttr(btf=sc.addr(data), btf_size=len(blob))
    try:
        return sc.bpf(sc.BPF_BTF_LOAD, attr, "cannot load BTF")
    except KernelError as e:
        first = e
    log = ctypes.create_string_buffer(1 << 20)
    attr.btf_log_buf, attr.btf_log_size, attr.btf_log_level = sc.addr(log), len(log), 1
    try:
        return sc.bpf(sc.BPF_BTF_LOAD, attr, "cannot load BTF")
    except KernelError as e:
        text = log.value.decode(errors="replace")
        if not text.strip():
            raise first from None
        raise VerifierError(e.errno, "the kernel rejected the object's BTF", text) from None


# -- BTF-defined maps (libbpf's convention) -------------------------------------
#
# A map is a variable in section .maps whose type is a struct; each member
# describes one attribute: `__uint(name, N)` is `int (*name)[N]` (N is the
# pointee array's length), `__type(name, T)` is `T *name` (the pointee is the
# key or value type; its size is key_size / value_size).

_UINT_FIELDS = {"type": "type", "max_entries": "max_entries", "map_flags": "flags",
                "key_size": "key_size", "value_size": "value_size"}
_TYPE_FIELDS = {"key": ("key_size", "btf_key_type_id"), "value": ("value_size", "btf_value_type_id")}


def map_definitions(btf: Btf) -> dict[str, dict[str, int]]:
    """{map name: {type, key_size, value_size, max_entries, flags, btf_key_type_id, btf_value_type_id}}."""
    sec = btf.datasec(".maps")
    if sec is None:
        return {}
    out = {}
    for var_type, _, _ in sec.secinfo:
        var = btf.types[var_type]
        out[var.name] = _map_definition(btf, var.name, btf.resolve(var.type))
    return out


def _map_definition(btf: Btf, name: str, t: BtfType) -> dict[str, int]:
    if t.kind != KIND_STRUCT:
        raise KernelError(errno.EINVAL, f"map {name!r}: its definition is not a struct")
    d = dict(type=0, key_size=0, value_size=0, max_entries=0, flags=0, btf_key_type_id=0,
             btf_value_type_id=0)
    for member, member_type, _ in t.members:
        ptr = btf.resolve(member_type)
        if ptr.kind != KIND_PTR:
            raise KernelError(errno.EINVAL, f"map {name!r}: field {member!r} is not a pointer")
        if member in _UINT_FIELDS:
            arr = btf.resolve(ptr.type)
            if arr.kind != KIND_ARRAY:
                raise KernelError(errno.EINVAL, f"map {name!r}: field {member!r} is not __uint()")
            key = _UINT_FIELDS[member]
            if key.endswith("_size") and d[key] not in (0, arr.array[1]):
                raise KernelError(errno.EINVAL, f"map {name!r}: {key} {arr.array[1]} contradicts its type")
            d[key] = arr.array[1]
        elif member in _TYPE_FIELDS:
            size_key, id_key = _TYPE_FIELDS[member]
            size = btf.size(ptr.type)
            if d[size_key] not in (0, size):
                raise KernelError(errno.EINVAL, f"map {name!r}: {size_key} {d[size_key]} contradicts its type")
            d[size_key], d[id_key] = size, ptr.type
        else:
            raise KernelError(errno.ENOTSUP, f"map {name!r}: field {member!r} is not supported by bpfwall's loader")
    return d


# -- .BTF.ext: function and line info per program section ------------------------

_EXT_HEADER = struct.Struct("=HBBIIIII")  # magic version flags hdr_len func_off func_len line_off line_len


def ext_info(ext: bytes, btf: Btf) -> dict[str, tuple[bytes, bytes]]:
    """{section: (func_info, line_info)} as the kernel takes them.

    The object's records hold byte offsets into their section; the kernel
    wants instruction indexes.
    """
    magic, version, _, hdr_len, func_off, func_len, line_off, line_len = _EXT_HEADER.unpack_from(ext)
    if magic != BTF_MAGIC or version != 1:
        raise _bad(f".BTF.ext magic {magic:#x} version {version}")
    funcs = _ext_records(ext[hdr_len + func_off:hdr_len + func_off + func_len], btf, sc.FUNC_INFO_REC_SIZE)
    lines = _ext_records(ext[hdr_len + line_off:hdr_len + line_off + line_len], btf, sc.LINE_INFO_REC_SIZE)
    return {sec: (funcs.get(sec, b""), lines.get(sec, b"")) for sec in funcs.keys() | lines.keys()}


def _ext_records(data: bytes, btf: Btf, rec_size: int) -> dict[str, bytes]:
    """One .BTF.ext subsection: u32 record size, then per ELF section
    {u32 section name offset, u32 count, records}; each record starts with insn_off."""
    if not data:
        return {}
    (size,) = struct.unpack_from("=I", data)
    if size != rec_size:
        raise _bad(f".BTF.ext records of {size} bytes, expected {rec_size}")
    out, pos = {}, 4
    while pos < len(data):
        name_off, count = struct.unpack_from("=II", data, pos)
        pos += 8
        recs = bytearray(data[pos:pos + rec_size * count])
        for i in range(count):
            (insn_off,) = struct.unpack_from("=I", recs, i * rec_size)
            struct.pack_into("=I", recs, i * rec_size, insn_off // 8)
        out[btf.name(name_off)] = bytes(recs)
        pos += rec_size * count
    return out



# -- one unit's BTF out of a batch object ------------------------------------------

@dataclass
class BtfSubset:
    """A BTF blob of some of another's types, renumbered: `ids` maps old type ids to new ones,
    `strings` old string offsets to new ones (for .BTF.ext records that point into either)."""
    blob: bytes
    ids: dict[int, int]
    strings: dict[int, int]


def subset(blob: bytes, roots: list[int], prefix: str, extra_strings=()) -> BtfSubset:
    """The BTF of one unit of a batch object (batch.py): the types reachable from `roots` (its
    FUNCs), plus the variables named `prefix`… of each DATASEC (its maps) and what they reach;
    names lose `prefix`, DATASEC variables are packed from offset 0 (sizes kept). `blob` is
    fixed up already (fixup_object_btf). `extra_strings` are offsets .BTF.ext records need."""
    btf = parse(blob)
    hdr_len, type_off, type_len = btf.header[3], btf.header[4], btf.header[5]
    raw = blob[hdr_len + type_off:hdr_len + type_off + type_len]
    ends = [t.offset for t in btf.types[2:]] + [type_len]

    secinfo: dict[int, list[tuple[int, int, int]]] = {}
    for t in btf.types:
        if t.kind == KIND_DATASEC:
            mine = [s for s in t.secinfo if btf.types[s[0]].name.startswith(prefix)]
            if mine:
                secinfo[t.id] = mine
    keep: set[int] = set()
    todo = list(roots) + list(secinfo)
    while todo:
        tid = todo.pop()
        if tid == 0 or tid in keep:
            continue
        keep.add(tid)
        t = btf.types[tid]
        if t.kind not in _SIZED:
            todo.append(t.type)
        todo += [m[1] for m in t.members] + [s[0] for s in secinfo.get(tid, [])]
        if t.kind == KIND_ARRAY:
            todo.append(t.array[0])
            todo.append(struct.unpack_from("=I", raw, t.offset + _TYPE.size + 4)[0])  # index type
        elif t.kind == KIND_FUNC_PROTO:
            todo += [struct.unpack_from("=I", raw, t.offset + _TYPE.size + 8 * i + 4)[0] for i in range(t.vlen)]
    ids = {0: 0} | {old: new for new, old in enumerate(sorted(keep), 1)}

    strings, offsets = bytearray(b"\0"), {0: 0}

    def string(off: int) -> int:
        if off not in offsets:
            name = btf.name(off)
            offsets[off] = len(strings)
            strings.extend((name[len(prefix):] if name.startswith(prefix) else name).encode() + b"\0")
        return offsets[off]

    out = bytearray()
    for tid in sorted(keep):
        t = btf.types[tid]
        rec = bytearray(raw[t.offset:ends[tid - 1]])
        name_off, info, size_or_type = _TYPE.unpack_from(rec)
        if t.kind == KIND_DATASEC:  # only the unit's variables, packed from 0
            items, size_or_type = [], 0
            for var, _, var_size in secinfo[tid]:
                size_or_type = (size_or_type + 7) & ~7
                items.append(struct.pack("=III", ids[var], size_or_type, var_size))
                size_or_type += var_size
            info = (info & ~0xFFFF) | len(items)
            rec = bytearray(_TYPE.size) + b"".join(items)
        elif t.kind not in _SIZED:
            size_or_type = ids[size_or_type]
        _TYPE.pack_into(rec, 0, string(name_off), info, size_or_type)
        body = _TYPE.size
        if t.kind == KIND_ARRAY:
            elem, index = struct.unpack_from("=II", rec, body)
            struct.pack_into("=II", rec, body, ids[elem], ids[index])
        for i in range(t.vlen if t.kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FUNC_PROTO) else 0):
            step = 8 if t.kind in (KIND_ENUM, KIND_FUNC_PROTO) else 12
            (m_name,) = struct.unpack_from("=I", rec, body + step * i)
            struct.pack_into("=I", rec, body + step * i, string(m_name))
            if t.kind in (KIND_STRUCT, KIND_UNION, KIND_FUNC_PROTO):
                (m_type,) = struct.unpack_from("=I", rec, body + step * i + 4)
                struct.pack_into("=I", rec, body + step * i + 4, ids[m_type])
        out += rec
    for off in extra_strings:
        string(off)
    header = _HEADER.pack(BTF_MAGIC, 1, 0, _HEADER.size, 0, len(out), len(out), len(strings))
    return BtfSubset(header + bytes(out) + bytes(strings), ids, offsets)
