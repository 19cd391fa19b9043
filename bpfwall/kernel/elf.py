"""Read a clang-built BPF ELF object into plain data: maps, programs, license, BTF.

What we accept: one function per program section (everything else
__always_inline: no bpf-to-bpf calls), libbpf-style BTF-defined maps in
`.maps`, and no global data: the only relocations are ld_imm64 of a map.

BpfObject and its parts are plain data, so a caller may cache one (objcache
keeps it as JSON) and skip pyelftools (imported only by read_object) on a warm
start.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field

from . import btf as btf_mod
from .errors import KernelError

# Bump whenever read_object (here or in btf.py) could make a different BpfObject from the
# same bytes: cached objects are keyed by it, so objects read by an older reader are not used.
READER_VERSION = 1

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
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile  # imported here: a cached BpfObject needs no pyelftools

    try:
        with open(path, "rb") as f:
            return _read(path, ELFFile(f))
    except ELFError as e:
        raise _error(path, f"not a valid ELF object ({e})") from None
    except OSError as e:
        raise KernelError(e.errno, f"cannot read {path}: {e.strerror}") from None


def _read(path: str, elf) -> BpfObject:
    from elftools.elf.constants import SH_FLAGS

    if elf["e_machine"] != "EM_BPF" or elf.elfclass != 64 or not elf.little_endian:
        raise _error(path, "not a 64-bit little-endian BPF object (compile with clang -target bpf)")
    sections = list(elf.iter_sections())
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        raise _error(path, "has no symbol table")
    symbols = list(symtab.iter_symbols())
    obj = BpfObject()

    license_sec = elf.get_section_by_name("license")
    if license_sec is None:
        raise _error(path, 'has no "license" section (char _license[] SEC("license") = "GPL";)')
    obj.license = license_sec.data().split(b"\0", 1)[0].decode()

    btf = None
    btf_sec = elf.get_section_by_name(".BTF")
    if btf_sec is not None:
        sizes = {s.name: s["sh_size"] for s in sections}
        offsets = {s.name: s["st_value"] for s in symbols if s["st_info"]["type"] == "STT_OBJECT"}
        obj.btf = btf_mod.fixup_object_btf(btf_sec.data(), sizes, offsets)
        btf = btf_mod.parse(obj.btf)
        for name, fields in btf_mod.map_definitions(btf).items():
            obj.maps[name] = MapDef(name=name, **fields)
    maps_sec = elf.get_section_by_name(".maps")
    if maps_sec is not None and btf is None:
        raise _error(path, "has maps in .maps but no .BTF to describe them (compile with -g)")
    maps_idx = elf.get_section_index(".maps") if maps_sec is not None else None

    ext = {}
    ext_sec = elf.get_section_by_name(".BTF.ext")
    if ext_sec is not None and btf is not None:
        ext = btf_mod.ext_info(ext_sec.data(), btf)

    for idx, sec in enumerate(sections):
        if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or not sec["sh_size"]:
            continue
        if sec.name == ".text":
            raise _error(path, "has functions outside program sections (.text): mark every "
                               "helper function static __always_inline; bpf-to-bpf calls are not supported")
        funcs = [s for s in symbols if s["st_shndx"] == idx and s["st_info"]["type"] == "STT_FUNC"]
        if len(funcs) != 1 or funcs[0]["st_value"] != 0:
            names = ", ".join(s.name for s in funcs) or "none"
            raise _error(path, f"section {sec.name} must hold exactly one function (it holds: {names})")
        insns = sec.data()
        relocs = _map_relocs(path, sec, idx, insns, symbols, sections, maps_idx, obj.maps)
        func_info, line_info = ext.get(sec.name, (b"", b""))
        obj.programs[sec.name] = ProgDef(sec.name, funcs[0].name, insns, relocs, func_info, line_info)
    return obj


def _map_relocs(path, sec, idx, insns, symbols, sections, maps_idx, maps) -> list[tuple[int, str]]:
    rel = next((s for s in sections if s["sh_type"] == "SHT_REL" and s["sh_info"] == idx), None)
    if rel is None:
        return []
    out = []
    for r in rel.iter_relocations():
        sym = symbols[r["r_info_sym"]]
        insn = r["r_offset"] // 8
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
