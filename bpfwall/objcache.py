"""The compiled-object cache: plain data, checked against its key on every read.

An entry is two files in the cache directory, named by the key (build._key):

    <key>.o     the ELF object clang wrote (for a unit compiled in a batch: the batch's, one
                file hard-linked under each of its units' keys)
    <key>.json  {"format", "key", "reader", "elf_sha256", "object", "object_sha256"}, where
                "object" is what kernel.elf.read_objects made of the .o (plain JSON, so a
                warm start imports no pyelftools)

The directory and every one above it must be root's (or the euid's) and not
writable by others, the files ours and not writable by others, none of them a
symlink (kernel/safefs.py). Anything wrong with an entry (missing, unreadable, of
another owner or mode, truncated, not JSON, recorded for another key, format or
reader version, a hash that does not match) is a miss: the caller compiles
again and the entry is rewritten. Nothing read here is ever executed.

A cache directory that cannot be trusted is not used at all, neither read nor
written: the first time, one warning on stderr names it, says why and how to
fix it; every build then runs clang. The cache only saves time, so a bad one
must not stop a firewall from loading.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import secrets
import sys

from .kernel import safefs
from .kernel.elf import READER_VERSION, BpfObject, MapDef, ProgDef

FORMAT = 1            # bump when the layout of an entry changes
MAX_ELF = 16 << 20    # far above any object bpfwall builds; a larger file is not ours
MAX_META = 4 * MAX_ELF

RULES = safefs.Rules(what="the compiled-object cache", file_what="the cache entry",
                     elsewhere="choose another with --cache-dir or BPFWALL_CACHE_DIR (e.g. /var/cache/bpfwall)")

_warned: set[str] = set()


def load(directory: str | os.PathLike, key: str) -> BpfObject | None:
    """The object cached under `key`, or None (a miss) if there is no sound entry for it."""
    d = _open(directory, create=False)
    if d is None:
        return None
    try:
        meta = d.read(f"{key}.json", MAX_META)
        return _decode(meta, _elf_sha256(d, f"{key}.o"), key)
    except (safefs.PathError, OSError, ValueError, TypeError, KeyError, RecursionError):
        return None  # a miss: rebuilt and rewritten by the caller
    finally:
        d.close()


# sha256 of the batch ELFs read by this process, by (device, inode, size, mtime, ctime): the units
# of one batch share its file (hard links), so a warm start reads and hashes it once, not once per
# unit. Files with one link (one unit's own ELF) are read every time, as they always were.
_shared_digests: dict[tuple, str] = {}


def _elf_sha256(d: safefs.CheckedDir, name: str) -> str:
    fd = d.open_file(name)
    try:
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if st.st_nlink > 1 and ident in _shared_digests:
            return _shared_digests[ident]
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, MAX_ELF + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ELF:
                raise ValueError("larger than any object bpfwall builds")
        digest = hashlib.sha256(b"".join(chunks)).hexdigest()
        if st.st_nlink > 1:
            _shared_digests[ident] = digest
        return digest
    finally:
        os.close(fd)


def store(directory: str | os.PathLike, key: str, elf: bytes, obj: BpfObject) -> None:
    """Keep `obj` (read from `elf`) for next time; a cache we cannot write only costs speed."""
    d = _open(directory, create=True)
    if d is None:
        return
    try:
        d.write(f"{key}.o", elf)
        # Last: the metadata vouches for the object, so a reader never sees it without one.
        d.write(f"{key}.json", _meta(key, hashlib.sha256(elf).hexdigest(), obj))
        os.fsync(d.fd)
    except (safefs.PathError, OSError):
        pass
    finally:
        d.close()


def store_batch(directory: str | os.PathLike, elf: bytes, entries: list[tuple[str, BpfObject]]) -> None:
    """store() for the units of one batch object (batch.py): `entries` are (key, object read from
    `elf`). The ELF is written once and hard-linked as each unit's `<key>.o` (an entry's ELF is the
    object its BpfObject was read from; a batch's holds its other units too)."""
    d = _open(directory, create=True)
    if d is None:
        return
    try:
        shared = d.stage("batch.o", elf)
        try:
            digest = hashlib.sha256(elf).hexdigest()
            for key, obj in entries:
                link = f".{key}.o.{secrets.token_hex(8)}{safefs.TEMP_SUFFIX}"
                os.link(shared, link, src_dir_fd=d.fd, dst_dir_fd=d.fd)
                d.commit(link, f"{key}.o")
                d.write(f"{key}.json", _meta(key, digest, obj))
        finally:
            d.discard(shared)
        os.fsync(d.fd)
    except (safefs.PathError, OSError):
        pass
    finally:
        d.close()


def _meta(key: str, elf_sha256: str, obj: BpfObject) -> bytes:
    plain = to_plain(obj)
    return json.dumps({"format": FORMAT, "key": key, "reader": READER_VERSION, "elf_sha256": elf_sha256,
                       "object": plain, "object_sha256": _digest(plain)}, sort_keys=True).encode()


def _open(directory: str | os.PathLike, create: bool) -> safefs.CheckedDir | None:
    try:
        return safefs.CheckedDir.open(os.fspath(directory), RULES, create=create)
    except safefs.UnsafePath as e:
        _warn_once(os.fspath(directory), str(e))
    except (safefs.PathError, OSError):
        pass
    return None


def _warn_once(directory: str, refusal: str) -> None:
    if directory in _warned:
        return
    _warned.add(directory)
    print(f"bpfwall: warning: compiling without the cache: {refusal}", file=sys.stderr)


def _decode(meta_bytes: bytes, elf_sha256: str, key: str) -> BpfObject | None:
    meta = json.loads(meta_bytes)
    if not isinstance(meta, dict):
        return None
    if (meta.get("format"), meta.get("key"), meta.get("reader")) != (FORMAT, key, READER_VERSION):
        return None
    if meta.get("elf_sha256") != elf_sha256:
        return None
    if meta.get("object_sha256") != _digest(meta.get("object")):
        return None
    return from_plain(meta["object"])


def _digest(plain) -> str:
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()


# -- BpfObject as plain JSON data -------------------------------------------------

def to_plain(obj: BpfObject) -> dict:
    return {
        "license": obj.license,
        "btf": _b64(obj.btf) if obj.btf is not None else None,
        "maps": [dataclasses.asdict(m) for m in obj.maps.values()],
        "programs": [{"section": p.section, "name": p.name, "insns": _b64(p.insns),
                      "map_relocs": [[index, name] for index, name in p.map_relocs],
                      "func_info": _b64(p.func_info), "line_info": _b64(p.line_info)}
                     for p in obj.programs.values()],
    }


def from_plain(data) -> BpfObject:
    """The BpfObject `data` describes; ValueError unless every field has its exact type."""
    _fields(data, ("license", "btf", "maps", "programs"))
    obj = BpfObject(license=_str(data["license"]),
                    btf=None if data["btf"] is None else _unb64(data["btf"]))
    for m in _list(data["maps"]):
        _fields(m, [f.name for f in dataclasses.fields(MapDef)])
        mapdef = MapDef(**{k: _str(v) if k == "name" else _u32(v) for k, v in m.items()})
        if mapdef.name in obj.maps:
            raise ValueError(f"map {mapdef.name!r} twice")
        obj.maps[mapdef.name] = mapdef
    for p in _list(data["programs"]):
        _fields(p, [f.name for f in dataclasses.fields(ProgDef)])
        prog = ProgDef(section=_str(p["section"]), name=_str(p["name"]), insns=_unb64(p["insns"]),
                       map_relocs=[_reloc(r, obj.maps) for r in _list(p["map_relocs"])],
                       func_info=_unb64(p["func_info"]), line_info=_unb64(p["line_info"]))
        if prog.section in obj.programs:
            raise ValueError(f"section {prog.section!r} twice")
        obj.programs[prog.section] = prog
    return obj


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value) -> bytes:
    return base64.b64decode(_str(value), validate=True)


def _fields(value, names) -> None:
    if type(value) is not dict or set(value) != set(names):
        raise ValueError(f"expected an object with exactly {sorted(names)}")


def _list(value) -> list:
    if type(value) is not list:
        raise ValueError("expected a list")
    return value


def _str(value) -> str:
    if type(value) is not str:
        raise ValueError("expected a string")
    return value


def _u32(value) -> int:
    if type(value) is not int or not 0 <= value < 1 << 32:
        raise ValueError("expected an unsigned 32-bit integer")
    return value


def _reloc(value, maps: dict) -> tuple[int, str]:
    if type(value) is not list or len(value) != 2:
        raise ValueError("expected [instruction, map]")
    index, name = _u32(value[0]), _str(value[1])
    if name not in maps:
        raise ValueError(f"relocation to unknown map {name!r}")
    return index, name
