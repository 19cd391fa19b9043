"""Checked expressions → ELF object, compiled by clang and cached by content.

The cache key is a hash of everything that decides the object's bytes: the
program source, the generated header, the compiler flags and the compiler's
identity (its resolved path, size and mtime, so a warm start runs no
subprocess). Next to each object lies its parsed form (kernel.elf.BpfObject),
so a warm load does not import pyelftools either.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .lower import c as lower_c

PROGRAM_VERSION = 1  # bump when the meaning of pins changes
DEFAULT_SET_CAPACITY = 4096


class BuildError(Exception):
    """The program could not be built; the message says why in one line."""


@dataclass(frozen=True)
class UnitProgram:
    """What one unit's object is built from: checked expressions and sizes."""
    ingress: object  # lang.checker.Checked | None
    egress: object
    set_capacity: int = DEFAULT_SET_CAPACITY
    # Tests only: read every header through bpf_skb_load_bytes, the path taken
    # for bytes outside the linear area, which BPF_PROG_TEST_RUN never produces.
    load_bytes_only: bool = False

    @property
    def params(self) -> list[str]:
        """Param slots, ordered by name so the layout does not depend on spelling order."""
        names = set()
        for checked in (self.ingress, self.egress):
            if checked is not None:
                names.update(checked.params)
        return sorted(names)

    @property
    def sets(self) -> dict[str, str]:
        kinds: dict[str, str] = {}
        for checked in (self.ingress, self.egress):
            if checked is not None:
                kinds.update(checked.sets)
        return kinds

    def meta(self) -> dict:
        """The self-description stored in the unit's `meta` map."""
        return {
            "version": PROGRAM_VERSION,
            "ingress": self.ingress.text if self.ingress is not None else None,
            "egress": self.egress.text if self.egress is not None else None,
            "params": self.params,
            "sets": self.sets,
            "set_capacity": self.set_capacity,
        }

    def meta_bytes(self) -> bytes:
        return json.dumps(self.meta(), sort_keys=True).encode()

    def meta_size(self) -> int:
        """Room for the meta JSON plus a NUL, in steps of 256 so similar units share objects."""
        return (len(self.meta_bytes()) // 256 + 1) * 256

    def header(self) -> str:
        return lower_c.header(
            self.ingress.expr if self.ingress is not None else None,
            self.egress.expr if self.egress is not None else None,
            self.params, self.sets, self.meta_size(), self.set_capacity)


def source_dir() -> Path:
    """Where port_filter.c lives: $BPFWALL_SOURCE, the repo's bpf/, or the installed copy."""
    env = os.environ.get("BPFWALL_SOURCE")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "bpf", here / "bpf"):
        if (candidate / "port_filter.c").is_file():
            return candidate
    raise BuildError("cannot find bpf/port_filter.c; set BPFWALL_SOURCE to the directory holding it")


def cache_dir() -> Path:
    env = os.environ.get("BPFWALL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bpfwall"


def _clang() -> str:
    path = shutil.which(os.environ.get("BPFWALL_CLANG", "clang"))
    if not path:
        raise BuildError("clang not found: install it (apt-get install clang) or set BPFWALL_CLANG")
    return os.path.realpath(path)


def _flags(program: UnitProgram | None = None) -> list[str]:
    # No -Werror: generated conditions may be tautological (saddr == saddr,
    # icmp_type <= 255) and are still exactly what the user wrote.
    flags = ["-O2", "-g", "-target", "bpf", "-w", f"-I/usr/include/{platform.machine()}-linux-gnu"]
    if program is not None and program.load_bytes_only:
        flags.append("-DBPFWALL_ONLY_LOAD_BYTES")
    return flags


def _key(clang: str, flags: list[str], source: bytes, header: str) -> str:
    st = os.stat(clang)
    h = hashlib.sha256()
    for part in (clang.encode(), str(st.st_size).encode(), str(st.st_mtime_ns).encode(),
                 " ".join(flags).encode(), source, header.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def _trusted(path: Path) -> bool:
    """A cached pickle is only read from a directory nobody else can write to."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def build(program: UnitProgram, cache: Path | None = None):
    """The kernel.elf.BpfObject for `program`, compiled or from the cache."""
    cache = cache or cache_dir()
    src_dir = source_dir()
    source = (src_dir / "port_filter.c").read_bytes()
    header = program.header()
    clang = _clang()
    flags = _flags(program)
    key = _key(clang, flags, source, header)
    parsed = cache / f"{key}.pickle"
    try:
        if parsed.exists() and _trusted(cache):
            with open(parsed, "rb") as f:
                return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        pass  # unreadable or damaged: rebuild below
    from .kernel.elf import read_object

    with tempfile.TemporaryDirectory(prefix="bpfwall-build-") as tmp:
        Path(tmp, "bpfwall_filter.h").write_text(header)
        obj_path = Path(tmp, "port_filter.o")
        cmd = [clang, *flags, f"-I{tmp}", "-c", str(src_dir / "port_filter.c"), "-o", str(obj_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [l for l in proc.stderr.splitlines() if "error" in l] or proc.stderr.splitlines() or ["?"]
            raise BuildError(f"clang failed to compile the filter: {lines[0].strip()}")
        obj = read_object(str(obj_path))
        _store(cache, key, obj_path.read_bytes(), pickle.dumps(obj), header.encode())
    return obj


def _store(cache: Path, key: str, obj: bytes, parsed: bytes, header: bytes) -> None:
    """Keep the object for next time; a cache we cannot write only costs speed."""
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        _atomic_write(cache / f"{key}.o", obj)
        _atomic_write(cache / f"{key}.h", header)
        _atomic_write(cache / f"{key}.pickle", parsed)
    except OSError:
        pass


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
