"""Load a BpfObject: its BTF, its maps (or reused ones), then its programs with map fds patched in."""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from . import syscall as sc
from .btf import btf_load
from .elf import BpfObject, MapDef, ProgDef
from .errors import KernelError
from .maps import map_create, map_info
from .progs import prog_load
from .vmlinux import KFUNC_PLACEHOLDERS, running_kernel

# Section name → (program type, expected attach type).
SECTIONS = {
    "cgroup_skb/ingress": (sc.BPF_PROG_TYPE_CGROUP_SKB, sc.BPF_CGROUP_INET_INGRESS),
    "cgroup_skb/egress": (sc.BPF_PROG_TYPE_CGROUP_SKB, sc.BPF_CGROUP_INET_EGRESS),
}


@dataclass
class Loaded:
    """The fds of a loaded object. close() closes those the load created, not reused ones."""
    maps: dict[str, int] = field(default_factory=dict)
    progs: dict[str, int] = field(default_factory=dict)  # by section
    _owned: list[int] = field(default_factory=list)

    def close(self) -> None:
        while self._owned:
            os.close(self._owned.pop())
        self.maps.clear()
        self.progs.clear()

    def __enter__(self) -> "Loaded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def map_compatible(fd: int, mapdef: MapDef) -> bool:
    """Whether the map at `fd` can stand in for `mapdef` (so its contents can be kept)."""
    info = map_info(fd)
    return (info.type, info.key_size, info.value_size, info.max_entries, info.flags) == (
        mapdef.type, mapdef.key_size, mapdef.value_size, mapdef.max_entries, mapdef.flags)


def load(obj: BpfObject, reuse: dict[str, int] | None = None, names: dict[str, str] | None = None) -> Loaded:
    """Create the object's maps (except those in `reuse`: name → fd, used as-is) and load its
    programs (named `names[section]` where given: the kernel's name, as bpftool shows it).
    On failure every fd created so far is closed and the error re-raised."""
    reuse, names = reuse or {}, names or {}
    for name in obj.programs:
        if name not in SECTIONS:
            raise KernelError(errno.EINVAL, f"program section {name}: not supported "
                                            f"(bpfwall loads {' and '.join(SECTIONS)})")
    loaded = Loaded()
    btf_fd = 0
    try:
        if obj.btf is not None:
            btf_fd = btf_load(obj.btf)
        for name, mapdef in obj.maps.items():
            if name in reuse:
                if not map_compatible(reuse[name], mapdef):
                    raise KernelError(errno.EINVAL, f"map {name!r}: the map given for reuse differs "
                                                    "in type, sizes or flags from the object's")
                loaded.maps[name] = reuse[name]
            else:
                loaded.maps[name] = _create(mapdef, btf_fd)
                loaded._owned.append(loaded.maps[name])
        for section, prog in obj.programs.items():
            loaded.progs[section] = _load_prog(obj, prog, loaded.maps, btf_fd, names.get(section))
            loaded._owned.append(loaded.progs[section])
    except BaseException:
        loaded.close()
        raise
    finally:
        if btf_fd:
            os.close(btf_fd)  # the maps and programs hold their own references
    return loaded


def _create(mapdef: MapDef, btf_fd: int) -> int:
    with_btf = btf_fd if mapdef.btf_value_type_id else 0
    return map_create(mapdef.type, mapdef.key_size, mapdef.value_size, mapdef.max_entries,
                      mapdef.flags, mapdef.name, with_btf, mapdef.btf_key_type_id,
                      mapdef.btf_value_type_id)


def _load_prog(obj: BpfObject, prog: ProgDef, map_fds: dict[str, int], btf_fd: int, kernel_name: str | None) -> int:
    insns = bytearray(prog.insns)
    for index, name in prog.map_relocs:
        if name not in map_fds:
            raise KernelError(errno.EINVAL, f"section {prog.section}: map {name!r} is not defined")
        off = index * 8
        insns[off + 1] = (insns[off + 1] & 0x0F) | (sc.BPF_PSEUDO_MAP_FD << 4)  # src_reg: high nibble
        struct.pack_into("=i", insns, off + 4, map_fds[name])
    _link_kfuncs(insns, prog.section)
    prog_type, attach_type = SECTIONS[prog.section]
    try:
        return prog_load(prog_type, bytes(insns), obj.license, attach_type, kernel_name or prog.name,
                         btf_fd, prog.func_info, prog.line_info)
    except KernelError as e:
        raise e.within(f"section {prog.section}") from None


_CALL = 0x85  # BPF_JMP | BPF_CALL


def _link_kfuncs(insns: bytearray, section: str) -> None:
    """Turn each call of a kfunc placeholder number (vmlinux.KFUNC_PLACEHOLDERS) into a call of
    that kfunc of the running kernel: its BTF id, src_reg BPF_PSEUDO_KFUNC_CALL."""
    for off in range(0, len(insns), 8):
        if insns[off] != _CALL or insns[off + 1] >> 4:
            continue
        (number,) = struct.unpack_from("=i", insns, off + 4)
        name = KFUNC_PLACEHOLDERS.get(number)
        if name is None:
            continue
        kernel = running_kernel()
        btf_id = kernel.func_id(name) if kernel is not None else None
        if btf_id is None:
            raise KernelError(errno.EINVAL, f"section {section}: the program calls kfunc {name}, "
                                            "which this kernel does not have")
        insns[off + 1] = (insns[off + 1] & 0x0F) | (sc.BPF_PSEUDO_KFUNC_CALL << 4)
        struct.pack_into("=i", insns, off + 4, btf_id)
