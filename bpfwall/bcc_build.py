"""Checked program → ELF object through bcc (python3-bpfcc), cached like clang's (build.py).

bcc compiles the same bpf/port_filter.c and generated header as clang, with -DBPFWALL_BCC
(see the top of port_filter.c: bcc brings its own helper declarations), in a separate
process (bcc_worker.py) that writes an ordinary object: the same sections, maps, relocations
and BTF, loaded by bpfwall's own loader into the same pins. The instructions in it are
checked to be the ones bcc generated.

bcc compiles against a kernel's headers. Those of the running kernel
(/lib/modules/$(uname -r)/build, or /sys/kernel/kheaders.tar.xz) are bcc's own choice; a host
whose kernel has no headers package (a cloud or custom kernel) gets those of the newest kernel
under /lib/modules — a distribution's headers package (linux-headers-amd64 on Debian, which
`make setup` installs). The program uses only the kernel's stable ABI (uapi structures,
helper numbers), which any headers of a kernel that has its helpers describe alike.
"""
from __future__ import annotations

import base64
import glob
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .build import BuildError, UnitProgram, _flags as clang_flags, _key, compile_cached, file_identity, first_error, \
    source_dir

WORKER = Path(__file__).with_name("bcc_worker.py")
MODULES = "/lib/modules"
KHEADERS = "/sys/kernel/kheaders.tar.xz"
# uname -m → the kernel's arch directory (bcc's kbuild_helper) and Debian's headers package.
_KERNEL_ARCH = {"x86_64": "x86", "aarch64": "arm64", "ppc64le": "powerpc", "s390x": "s390", "riscv64": "riscv"}
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64el", "s390x": "s390x", "riscv64": "riscv64"}


@dataclass(frozen=True)
class Headers:
    """The kernel headers bcc compiles against."""
    source: str | None = None  # BCC_KERNEL_SOURCE to give bcc; None: bcc finds the running kernel's
    build: str | None = None   # Debian's split packages: the flavour's generated headers

    def cflags(self) -> list[str]:
        if self.build is None:
            return []
        arch = _KERNEL_ARCH.get(platform.machine(), platform.machine())
        return [f"-I{self.build}/arch/{arch}/include/generated/uapi", f"-I{self.build}/arch/{arch}/include/generated",
                f"-I{self.build}/include", f"-I{self.build}/include/generated/uapi"]

    def identity(self) -> str:
        """For the cache key: which headers, and which version of them (their generated config)."""
        running = os.path.join(MODULES, os.uname().release)
        trees = [t for t in (self.source, self.build) if t] or [f"{running}/source", f"{running}/build"]
        files = [os.path.join(t, n) for t in trees for n in ("include/generated/autoconf.h", "include/linux/kconfig.h")]
        return "\0".join(file_identity(f) for f in [*files, KHEADERS] if os.path.isfile(f))


def _has(tree: str, name: str) -> bool:
    return os.path.isfile(os.path.join(tree, name))


def _version(name: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def kernel_headers() -> Headers:
    """The headers bcc will compile against; BuildError naming what is missing and how to fix it."""
    given = os.environ.get("BCC_KERNEL_SOURCE")
    if given:
        if not _has(given, "include/linux/kconfig.h"):
            raise BuildError(f"bcc needs kernel headers: BCC_KERNEL_SOURCE={given} holds none "
                             "(no include/linux/kconfig.h); point it at a kernel source tree or unset it")
        return Headers(source=given)
    release = os.uname().release
    running = os.path.join(MODULES, release)
    if _has(running, "source/include/linux/kconfig.h") or _has(running, "build/include/linux/kconfig.h") \
            or os.path.isfile(KHEADERS):
        return Headers()
    try:
        others = sorted(os.listdir(MODULES), key=_version, reverse=True)
    except OSError:
        others = []
    for name in others:
        build, source = os.path.join(MODULES, name, "build"), os.path.join(MODULES, name, "source")
        if not _has(build, "include/generated/autoconf.h"):
            continue
        if _has(build, "include/linux/kconfig.h"):
            return Headers(source=os.path.realpath(build))
        if _has(source, "include/linux/kconfig.h"):
            return Headers(source=os.path.realpath(source), build=os.path.realpath(build))
    package = f"linux-headers-{_DEBIAN_ARCH.get(platform.machine(), '<arch>')}"
    raise BuildError(f"bcc needs kernel headers: there are none for the running kernel {release} "
                     f"({running}/build) nor for any other kernel in {MODULES}; install a headers "
                     f"package (Debian: apt-get install {package}, as `make setup` does) or set "
                     "BCC_KERNEL_SOURCE to a kernel source tree")


def _libbcc() -> str | None:
    """libbcc's file, found without loading it (which maps LLVM: ~0.1 s)."""
    multiarch = f"{platform.machine()}-linux-gnu"
    for d in (f"/usr/lib/{multiarch}", f"/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        path = os.path.join(d, "libbcc.so.0")
        if os.path.exists(path):
            return os.path.realpath(path)
    return None


def missing() -> str | None:
    """Why bcc cannot compile here (one phrase), or None when it can."""
    if importlib.util.find_spec("bcc") is None or _libbcc() is None:
        return (f"bcc is not installed for {sys.executable} (apt-get install python3-bpfcc; it needs "
                "Debian's python3 or a venv made with --system-site-packages)")
    try:
        kernel_headers()
    except BuildError as e:
        return str(e)
    return None


def identity(headers: Headers) -> str:
    """bcc as the cache key knows it: libbcc, the LLVM beside it, its Python binding, the worker
    and the kernel headers, each by path and stat (a warm start runs no subprocess)."""
    lib = _libbcc()
    spec = importlib.util.find_spec("bcc")
    if lib is None or spec is None or spec.origin is None:
        raise BuildError(missing() or "bcc is not installed")
    files = [lib, spec.origin, str(WORKER), *sorted(glob.glob(os.path.join(os.path.dirname(lib), "libLLVM*.so*")))]
    return "\0".join(["bcc", *(file_identity(f) for f in files), headers.identity()])


def _flags(program: UnitProgram, headers: Headers) -> list[str]:
    # /usr/include last: bcc puts the kernel's headers first, and only libbpf's bpf_endian.h is
    # wanted from there. The program's own -D flags are clang's (build._flags), so both build it alike.
    defines = [f for f in clang_flags(program) if f.startswith("-D")]
    return [*headers.cflags(), "-idirafter", "/usr/include", "-DBPFWALL_BCC", *defines]


def build(program: UnitProgram, cache: Path):
    """The kernel.elf.BpfObject for `program` compiled by bcc, or from the cache."""
    problem = missing()
    if problem is not None:
        raise BuildError(f"cannot build with bcc: {problem}")
    headers = kernel_headers()
    src_dir = source_dir()
    header = program.header()
    flags = _flags(program, headers)
    key = _key(identity(headers), flags, (src_dir / "port_filter.c").read_bytes(), header)

    def compile_into(tmp: Path, obj_path: Path):
        functions = tmp / "functions.json"
        env = dict(os.environ)
        if headers.source is not None:
            env["BCC_KERNEL_SOURCE"] = headers.source
        cmd = [sys.executable, "-I", str(WORKER), str(obj_path), str(functions), str(src_dir / "port_filter.c"),
               *flags, f"-I{tmp}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:  # clang's first diagnostic, else the first thing bcc or the worker said
            raise BuildError(f"bcc failed to compile the filter: {first_error(proc.stderr, 'error:')}")
        generated = json.loads(functions.read_text())

        def holds_what_bcc_generated(obj) -> None:
            for prog in obj.programs.values():
                if base64.b64decode(generated.get(prog.name, "")) != prog.insns:
                    raise BuildError(f"bcc's object for {prog.section} does not hold the code bcc generated "
                                     f"for {prog.name}: a bcc or LLVM this bpfwall does not know")
        return holds_what_bcc_generated

    return compile_cached(cache, key, header, "bpfwall-bcc-", compile_into)
