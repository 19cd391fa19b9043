"""Checked expressions → ELF object, compiled by clang and cached by content.

The cache key is a hash of everything that decides the object: the program
source, the generated header, the compiler flags, the compiler's identity
(its resolved path, device, inode, size, mtime and ctime, so a warm start runs
no subprocess), bpfwall's ELF/BTF reader version and the cache format. The
entries are plain data checked on every read (objcache). A program whose
compiler is bcc is built by bcc_build instead (compilers.py says which).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from . import batch, objcache, program_contract
from .kernel import vmlinux
from .errors import Error
from .kernel.elf import READER_VERSION
from .lower import c as lower_c

PROGRAM_VERSION = 1  # bump when the meaning of pins changes
DEFAULT_SET_CAPACITY = 4096


class BuildError(Error):
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
    # A slice default: the program is the slice's guard (port_filter.c's BPFWALL_SLICE_GUARD),
    # judging only the descendants its `guard` map does not hand to a deeper filter; strict:
    # it drops those the watcher has not classified yet.
    slice_default: bool = False
    strict: bool = False
    compiler: str = "auto"  # compilers.CHOICES: what builds it; resolved() names the one that will

    def resolved(self) -> "UnitProgram":
        """This program with its compiler chosen (auto: the one available here; BuildError if none)."""
        from .compilers import resolve

        return self if self.compiler != "auto" else replace(self, compiler=resolve(self.compiler))

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

    @property
    def interfaces(self) -> list[str]:
        """The interface names (and patterns) the filters name: bit i of the kernel's `ifaces`
        values is name i, sorted so that the layout does not depend on spelling order."""
        names = set()
        for checked in (self.ingress, self.egress):
            if checked is not None:
                names.update(checked.interfaces)
        return sorted(names)

    def meta(self) -> dict:
        """The self-description stored in the unit's `meta` map."""
        extra = {"interfaces": self.interfaces} if self.interfaces else {}  # others' meta as before
        return {
            **extra,
            "version": PROGRAM_VERSION,
            "ingress": self.ingress.text if self.ingress is not None else None,
            "egress": self.egress.text if self.egress is not None else None,
            "params": self.params,
            "sets": self.sets,
            "set_capacity": self.set_capacity,
            "compiler": self.compiler,
            # only for slice defaults: a unit's description stays what it was
            **({"slice_default": {"strict": self.strict}} if self.slice_default else {}),
        }

    def meta_bytes(self) -> bytes:
        return json.dumps(self.meta(), sort_keys=True).encode()

    def meta_size(self) -> int:
        return program_contract.meta_size(len(self.meta_bytes()))

    def header(self) -> str:
        return lower_c.header(
            self.ingress.expr if self.ingress is not None else None,
            self.egress.expr if self.egress is not None else None,
            self.params, self.sets, self.meta_size(), self.set_capacity, self.interfaces)


def source_dir() -> Path:
    """Where port_filter.c lives: $BPFWALL_SOURCE, the repo's bpf/, `make install`'s copy in the
    package, or the wheel's data file under the interpreter's prefix (the Debian package's
    /usr/share/bpfwall/bpf, a venv's share/bpfwall/bpf)."""
    env = os.environ.get("BPFWALL_SOURCE")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "bpf", here / "bpf", Path(sys.prefix) / "share" / "bpfwall" / "bpf"):
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
    # -Wall: port_filter.c and the generated C compile without warnings (tests/unit/test_lower_c.py
    # checks with -Werror). No -Werror here: a newer clang's new warning must not stop a firewall
    # from loading.
    flags = ["-O2", "-g", "-target", "bpf", "-Wall", f"-I/usr/include/{platform.machine()}-linux-gnu"]
    if program is not None and program.load_bytes_only:
        flags.append("-DBPFWALL_ONLY_LOAD_BYTES")
    if program is not None and program.slice_default:
        flags.append("-DBPFWALL_SLICE_GUARD")
        flags.extend(_socket_cgroup_id_flags())
        if program.strict:
            flags.append("-DBPFWALL_STRICT")
    return flags


def _socket_cgroup_id_flags() -> list[str]:
    """How the guard reads a packet's cgroup id on this kernel: with loads at these offsets
    (kernel/vmlinux.py says why), or, without them, by the helper. The offsets are in the cache
    key, so an object built for another kernel's layout is not reused."""
    offsets = vmlinux.socket_cgroup_id_offsets()
    if offsets is None:
        return []
    return [f"-DBPFWALL_KFUNC_CAST_TO_KERN_CTX={vmlinux.kfunc_placeholder('bpf_cast_to_kern_ctx'):#x}",
            *(f"-DBPFWALL_OFF_{name}={offset}" for name, offset in offsets.items())]


def file_identity(path: str) -> str:
    """A file as the cache key knows it: path and stat, which change when it is replaced."""
    st = os.stat(path)
    return f"{path}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _key(compiler: str, flags: list[str], source: bytes, header: str) -> str:
    """`compiler`: its identity (file_identity of clang; bcc_build.identity)."""
    h = hashlib.sha256()
    for part in (f"format {objcache.FORMAT} reader {READER_VERSION}".encode(), compiler.encode(),
                 "\0".join(flags).encode(), source, header.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def compile_command(program: UnitProgram, source: Path, include_dir: str, output: Path) -> list[str]:
    """The clang command build() runs: `source` (port_filter.c, or a file that includes it) with
    the program's generated header in `include_dir`, into the object `output`."""
    return [_clang(), *_flags(program), f"-I{include_dir}", "-c", str(source), "-o", str(output)]


def build(program: UnitProgram, cache: Path | None = None):
    """The kernel.elf.BpfObject for `program`, compiled or from the cache."""
    cache = cache or cache_dir()
    program = program.resolved()
    if program.compiler == "bcc":
        from . import bcc_build

        return bcc_build.build(program, cache)
    src_dir = source_dir()
    header = program.header()
    key = _key(file_identity(_clang()), _flags(program), (src_dir / "port_filter.c").read_bytes(), header)

    def compile_into(tmp: Path, obj_path: Path) -> None:
        proc = subprocess.run(compile_command(program, src_dir / "port_filter.c", str(tmp), obj_path),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"clang failed to compile the filter: {first_error(proc.stderr, 'error')}")

    return compile_cached(cache, key, header, "bpfwall-build-", compile_into)


def compile_cached(cache: Path, key: str, header: str, prefix: str, compile_into):
    """The object cached under `key`, else compiled: `compile_into(tmp, obj_path)` builds
    port_filter.c with `header` (written into `tmp` as bpfwall_filter.h) into `obj_path`, raising
    BuildError on failure; it may return a check of the object read back (raising BuildError),
    run before the object is cached. Both compilers build this way."""
    obj = objcache.load(cache, key)
    if obj is not None:
        return obj
    from .kernel.elf import read_object

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        Path(tmp, "bpfwall_filter.h").write_text(header)
        obj_path = Path(tmp, "port_filter.o")
        check = compile_into(Path(tmp), obj_path)
        elf = obj_path.read_bytes()
        obj = read_object(str(obj_path))
    if check is not None:
        check(obj)
    objcache.store(cache, key, elf, obj)
    return obj


def first_error(stderr: str, marker: str) -> str:
    """The compiler's first line holding `marker`, else its first line: what a BuildError says."""
    lines = [line for line in stderr.splitlines() if marker in line] or stderr.splitlines() or ["?"]
    return lines[0].strip()


def build_many(programs, cache: Path | None = None, jobs: int | None = None) -> list:
    """build() for each of `programs`, in order: cache hits read, misses compiled by up to `jobs`
    clang processes at once (default: one per CPU), several units per process (batch.py: a
    compile is ~0.12 s of CPU, a third of it clang's start-up, and a policy of 100 units at boot
    waits for all of them). Identical programs compile once. Once the compiles have ended, the
    BuildError of the first program (in order) that failed is raised."""
    cache = cache or cache_dir()
    programs = [p.resolved() for p in programs]
    signatures = [(p.header(), tuple(_flags(p)), p.compiler) for p in programs]
    first: dict[tuple, UnitProgram] = {}
    for sig, program in zip(signatures, programs, strict=False):
        first.setdefault(sig, program)
    built, misses = {}, []
    source = (source_dir() / "port_filter.c").read_bytes()
    for sig, program in first.items():
        if program.compiler != "clang":  # bcc: each alone, through build() and its own key
            misses.append((sig, program, None))
            continue
        key = _key(file_identity(_clang()), list(sig[1]), source, sig[0])
        obj = objcache.load(cache, key)
        if obj is None:
            misses.append((sig, program, key))
        else:
            built[sig] = obj
    workers = max(1, min(jobs or len(os.sched_getaffinity(0)), len(misses)))
    groups = batch.groups(misses, workers, lambda m: (m[0][1:], m[1].compiler == "clang"  # bcc: one unit a run
                                                      and batch.batchable(m[1].params, m[1].sets)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bpfwall-build") as pool:
        futures = [pool.submit(_build_group, group, cache) for group in groups]
        try:
            for group, future in zip(groups, futures, strict=True):
                built.update(zip((sig for sig, _, _ in group), future.result(), strict=True))
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    failed = next((built[sig] for sig in signatures if isinstance(built[sig], BuildError)), None)
    if failed is not None:
        raise failed
    return [built[sig] for sig in signatures]


def _build_group(group: list[tuple[tuple, UnitProgram, str]], cache: Path) -> list:
    """The objects of one group of cache misses (signature, program, key), or the BuildError of
    those that failed: one clang run for them all, or each alone when it is one, or when the
    batch fails (so that an error names its own unit's first line, as build() reports it)."""
    if len(group) > 1 and group[0][1].compiler == "clang":  # a group holds one compiler's programs
        program = group[0][1]
        try:
            elf, objects = batch.compile_batch([_clang(), *_flags(program)], source_dir(),
                                               [(p.header(), p.sets) for _, p, _ in group])
        except batch.BatchError:
            pass
        else:
            objcache.store_batch(cache, elf, [(key, obj) for (_, _, key), obj in zip(group, objects, strict=True)])
            return objects
    out = []
    for _, program, _ in group:
        try:
            out.append(build(program, cache))
        except BuildError as e:
            out.append(e)
    return out
