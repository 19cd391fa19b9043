"""Read a clang-built BPF ELF object into plain data: maps, programs, license, BTF.

What we accept: one function per program section (everything else
__always_inline: no bpf-to-bpf calls), libbpf-style BTF-defined maps in
`.maps`, and no global data: the only relocations are ld_imm64 of a map.
A batch object (bpfwall/batch.py) holds several units: per program section one
function per unit, told apart, like its maps and BTF types, by a name prefix;
each unit is read as the object it would be alone.

BpfObject and its parts are plain data, so a caller may cache one (objcache
keeps it as JSON) and skip pyelftools (imported only by read_object) on a warm
start.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

from . import btf as btf_mod
from .errors import KernelError

# Bump whenever read_objects (here or in btf.py), or a batch of batch.py, could make a different
# BpfObject from the same program: cached objects are keyed by it, so objects read by an older
# reader are not used.
READER_VERSION = 2

LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: the 16-byte instruction that loads a map


@dataclass
class MapDef:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    btf_key_type_id: int
    btf_value_type_id: int


@dataclass
class ProgDef:
    section: str
    name: str                             # the function's symbol
    insns: bytes
    map_relocs: list[tuple[int, str]]     # (index of the ld_imm64 instruction, map name)
    func_info: bytes = b""                # kernel-ready .BTF.ext records (see btf.ext_info)
    line_info: bytes = b""


@dataclass
class BpfObject:
    maps: dict[str, MapDef] = field(default_factory=dict)
    programs: dict[str, ProgDef] = field(default_factory=dict)  # by section name
    license: str = ""
    btf: bytes | None = None              # fixed up (btf.fixup_object_btf), ready for btf_load


def _error(path: str, what: str) -> KernelError:
    return KernelError(errno.EINVAL, f"{path}: {what}")


def read_object(path: str) -> BpfObject:
    return read_objects(path, [""])[0]


def read_objects(path: str, prefixes: list[str]) -> list[BpfObject]:
    """One BpfObject per prefix: "" is the whole object; a batch object (batch.py) holds one unit
    per prefix, whose programs, maps and BTF types are the symbols and names starting with it
    (the prefix is taken off)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile  # imported here: a cached BpfObject needs no pyelftools

    try:
        with open(path, "rb") as f:
            parsed = _Parsed(path, ELFFile(f))
            return [parsed.unit(prefix) for prefix in prefixes]
    except ELFError as e:
        raise _error(path, f"not a valid ELF object ({e})") from None
    except OSError as e:
        raise KernelError(e.errno, f"cannot read {path}: {e.strerror}") from None


class _Parsed:
    """What every unit of an object shares, read once: sections, symbols, license, BTF, maps."""

    def __init__(self, path: str, elf):
        self.path = path
        if elf["e_machine"] != "EM_BPF" or elf.elfclass != 64 or not elf.little_endian:
            raise _error(path, "not a 64-bit little-endian BPF object (compile with clang -target bpf)")
        self.sections = list(elf.iter_sections())
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None:
            raise _error(path, "has no symbol table")
        self.symbols = list(symtab.iter_symbols())

        license_sec = elf.get_section_by_name("license")
        if license_sec is None:
            raise _error(path, 'has no "license" section (char _license[] SEC("license") = "GPL";)')
        self.license = license_sec.data().split(b"\0", 1)[0].decode()

        self.btf_blob = self.btf = None
        self.maps: dict[str, MapDef] = {}
        btf_sec = elf.get_section_by_name(".BTF")
        if btf_sec is not None:
            sizes = {s.name: s["sh_size"] for s in self.sections}
            offsets = {s.name: s["st_value"] for s in self.symbols if s["st_info"]["type"] == "STT_OBJECT"}
            self.btf_blob = btf_mod.fixup_object_btf(btf_sec.data(), sizes, offsets)
            self.btf = btf_mod.parse(self.btf_blob)
            for name, fields in btf_mod.map_definitions(self.btf).items():
                self.maps[name] = MapDef(name=name, **fields)
        maps_sec = elf.get_section_by_name(".maps")
        if maps_sec is not None and self.btf is None:
            raise _error(path, "has maps in .maps but no .BTF to describe them (compile with -g)")
        self.maps_idx = elf.get_section_index(".maps") if maps_sec is not None else None

        self.ext = {}
        ext_sec = elf.get_section_by_name(".BTF.ext")
        if ext_sec is not None and self.btf is not None:
            self.ext = btf_mod.ext_info(ext_sec.data(), self.btf)

    def unit(self, prefix: str) -> BpfObject:
        from elftools.elf.constants import SH_FLAGS

        path = self.path
        obj = BpfObject(license=self.license)
        maps = {name: m for name, m in self.maps.items() if name.startswith(prefix)}
        progs = []  # (section index, section, function symbol, its first instruction, last + 1)
        for idx, sec in enumerate(self.sections):
            if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or not sec["sh_size"]:
                continue
            if sec.name == ".text":
                raise _error(path, "has functions outside program sections (.text): mark every "
                                   "helper function static __always_inline; bpf-to-bpf calls are not supported")
            funcs = [s for s in self.symbols if s["st_shndx"] == idx and s["st_info"]["type"] == "STT_FUNC"]
            mine = [s for s in funcs if s.name.startswith(prefix)]
            whole = not prefix and len(funcs) == 1 and funcs[0]["st_value"] == 0
            aligned = mine and mine[0]["st_value"] % 8 == 0 and mine[0]["st_size"] % 8 == 0
            if not whole and not (prefix and len(mine) == 1 and aligned):
                names = ", ".join(s.name for s in funcs) or "none"
                raise _error(path, f"section {sec.name} must hold exactly one function"
                                   f"{f' named {prefix}…' if prefix else ''} (it holds: {names})")
            start = mine[0]["st_value"] // 8
            end = start + mine[0]["st_size"] // 8 if prefix else sec["sh_size"] // 8
            progs.append((idx, sec, mine[0], start, end))

        ids, strings = {}, {}
        if self.btf is not None and prefix:
            roots, extra = [], []
            for _, sec, _, start, end in progs:
                func_info, line_info = self.ext.get(sec.name, (b"", b""))
                roots += [r[1] for r in _records(func_info, "=II", start, end)]
                extra += [s for r in _records(line_info, "=IIII", start, end) for s in r[1:3]]
            sub = btf_mod.subset(self.btf_blob, roots, prefix, extra)
            obj.btf, ids, strings = sub.blob, sub.ids, sub.strings
        else:
            obj.btf = self.btf_blob
        for name, m in maps.items():
            obj.maps[name[len(prefix):]] = MapDef(
                name[len(prefix):], m.type, m.key_size, m.value_size, m.max_entries, m.flags,
                ids.get(m.btf_key_type_id, m.btf_key_type_id), ids.get(m.btf_value_type_id, m.btf_value_type_id))

        for idx, sec, func, start, end in progs:
            insns = sec.data()[start * 8:end * 8]
            relocs = [(insn - start, name[len(prefix):]) for insn, name in
                      _map_relocs(path, sec, idx, sec.data(), self.symbols, self.sections, self.maps_idx, maps,
                                  range(start, end))]
            func_info, line_info = self.ext.get(sec.name, (b"", b""))
            if prefix:
                func_info = b"".join(struct.pack("=II", off - start, ids[t])
                                     for off, t in _records(func_info, "=II", start, end))
                line_info = b"".join(struct.pack("=IIII", off - start, strings[f], strings[l], col)
                                     for off, f, l, col in _records(line_info, "=IIII", start, end))
            obj.programs[sec.name] = ProgDef(sec.name, func.name[len(prefix):], insns, relocs, func_info, line_info)
        return obj


def _records(data: bytes, fmt: str, start: int, end: int) -> list[tuple]:
    """The .BTF.ext records (kernel-ready: instruction indexes first) of instructions start..end-1."""
    return [r for r in struct.iter_unpack(fmt, data) if start <= r[0] < end]


def _map_relocs(path, sec, idx, insns, symbols, sections, maps_idx, maps, within: range) -> list[tuple[int, str]]:
    rel = next((s for s in sections if s["sh_type"] == "SHT_REL" and s["sh_info"] == idx), None)
    if rel is None:
        return []
    out = []
    for r in rel.iter_relocations():
        sym = symbols[r["r_info_sym"]]
        insn = r["r_offset"] // 8
        if insn not in within:  # another unit's function in this section
            continue
        if sym["st_shndx"] != maps_idx or sym.name not in maps:
            raise _error(path, f"section {sec.name}, instruction {insn}: refers to {_describe(sym, sections)}; "
                               "bpfwall objects may refer only to maps in .maps (no global data, no calls)")
        if insns[insn * 8] != LD_IMM64:
            raise _error(path, f"section {sec.name}, instruction {insn}: map {sym.name!r} used by "
                               f"opcode {insns[insn * 8]:#x}, not ld_imm64")
        out.append((insn, sym.name))
    return out


def _describe(sym, sections) -> str:
    shndx = sym["st_shndx"]
    where = sections[shndx].name if isinstance(shndx, int) else "no section (undefined)"
    if sym["st_info"]["type"] == "STT_SECTION":
        return f"section {where}"
    return f"{sym.name!r} in {where}"
