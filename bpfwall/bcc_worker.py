"""Compile one C file with bcc into a BPF ELF object: run by bcc_build as `python3 -I`.

    bcc_worker.py OUTPUT.o FUNCTIONS.json SOURCE.c [CFLAGS...]

bcc (python3-bpfcc's libbcc) compiles the file with its embedded clang and its own pipeline
(rewriter, -O3 passes) and then generates code with MCJIT in memory; it offers no object file.
Asked for DEBUG_LLVM_IR it prints the optimized module, which is exactly what it hands to
MCJIT. This script parses that module again in the LLVM that libbcc itself runs on and emits it
as an object with the same BPF target, so the object holds libbcc's code with the sections,
relocations and BTF a clang object has (bpfwall's own ELF reader and loader then take over).
FUNCTIONS.json records the instructions libbcc generated for each function, so that the
caller checks the object holds exactly those.

A separate process: libbcc and LLVM (~150 MB mapped) stay out of bpfwall, and the module
arrives on stdout, where LLVM prints it. Imports nothing of bpfwall (run with -I).
Exit status 1 with the reason on stderr when anything fails.
"""
import base64
import ctypes
import json
import os
import re
import sys

DEBUG_LLVM_IR = 0x1
MAIN_MODULE = b"; ModuleID = '/virtual/main.c'"
OBJECT_FILE = 1                  # LLVMObjectFile
CODEGEN_DEFAULT = 2              # LLVMCodeGenLevelDefault: what MCJIT uses
RELOC_DEFAULT = CODE_MODEL_DEFAULT = 0


def fail(message: str):
    sys.stderr.write(f"{message}\n")
    sys.exit(1)


def compile_module(lib, source: str, cflags: list[str], ir_path: str) -> int:
    """libbcc's module for `source`, its optimized IR printed into `ir_path`."""
    argv = (ctypes.c_char_p * len(cflags))(*[f.encode() for f in cflags])
    sys.stdout.flush()
    saved = os.dup(1)
    ir = os.open(ir_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(ir, 1)
    try:
        module = lib.bpf_module_create_c(source.encode(), DEBUG_LLVM_IR, argv, len(cflags), True, None)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(ir)
    if not module:
        fail("bcc could not compile the program")
    return module


def bcc_functions(lib, module) -> dict[str, str]:
    """{function: its instructions as libbcc generated them, base64}."""
    out = {}
    for i in range(lib.bpf_num_functions(module)):
        name = lib.bpf_function_name(module, i)
        start, size = lib.bpf_function_start(module, name), lib.bpf_function_size(module, name)
        if start and size:
            out[name.decode()] = base64.b64encode(ctypes.string_at(start, size)).decode()
    return out


def loaded_llvm() -> str:
    """The LLVM library libbcc runs on (mapped into this process by loading libbcc)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            m = re.search(r"(/\S*/libLLVM[-.\w]*\.so[.\d]*)$", line.strip())
            if m:
                return m.group(1)
    fail("cannot find the LLVM library libbcc runs on")


def emit_object(llvm_path: str, ir: bytes) -> bytes:
    """`ir`, a module for the BPF target, as an ELF object."""
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    llvm = ctypes.CDLL(llvm_path)
    for init in ("LLVMInitializeBPFTargetInfo", "LLVMInitializeBPFTarget", "LLVMInitializeBPFTargetMC",
                 "LLVMInitializeBPFAsmPrinter"):
        getattr(llvm, init)()
    llvm.LLVMContextCreate.restype = vp
    llvm.LLVMCreateMemoryBufferWithMemoryRangeCopy.restype = vp
    llvm.LLVMCreateMemoryBufferWithMemoryRangeCopy.argtypes = [cp, ctypes.c_size_t, cp]
    llvm.LLVMParseIRInContext.argtypes = [vp, vp, ctypes.POINTER(vp), ctypes.POINTER(cp)]
    llvm.LLVMGetTarget.restype = cp
    llvm.LLVMGetTarget.argtypes = [vp]
    llvm.LLVMGetTargetFromTriple.argtypes = [cp, ctypes.POINTER(vp), ctypes.POINTER(cp)]
    llvm.LLVMCreateTargetMachine.restype = vp
    llvm.LLVMCreateTargetMachine.argtypes = [vp, cp, cp, cp, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    llvm.LLVMTargetMachineEmitToMemoryBuffer.argtypes = [vp, vp, ctypes.c_int, ctypes.POINTER(cp), ctypes.POINTER(vp)]
    llvm.LLVMGetBufferStart.restype = vp
    llvm.LLVMGetBufferStart.argtypes = [vp]
    llvm.LLVMGetBufferSize.restype = ctypes.c_size_t
    llvm.LLVMGetBufferSize.argtypes = [vp]

    err, module, target, out = cp(), vp(), vp(), vp()
    buf = llvm.LLVMCreateMemoryBufferWithMemoryRangeCopy(ir, len(ir), b"bcc")
    if llvm.LLVMParseIRInContext(llvm.LLVMContextCreate(), buf, ctypes.byref(module), ctypes.byref(err)):
        fail(f"LLVM cannot read the module bcc printed: {err.value.decode(errors='replace')}")
    triple = llvm.LLVMGetTarget(module)  # bcc set it: bpf-pc-linux
    if llvm.LLVMGetTargetFromTriple(triple, ctypes.byref(target), ctypes.byref(err)):
        fail(f"LLVM has no target {triple!r}: {err.value.decode(errors='replace')}")
    # MCJIT's choices: CPU "generic", no features, the default codegen level.
    machine = llvm.LLVMCreateTargetMachine(target, triple, b"generic", b"", CODEGEN_DEFAULT, RELOC_DEFAULT,
                                           CODE_MODEL_DEFAULT)
    if llvm.LLVMTargetMachineEmitToMemoryBuffer(machine, module, OBJECT_FILE, ctypes.byref(err), ctypes.byref(out)):
        fail(f"LLVM cannot emit the object: {err.value.decode(errors='replace')}")
    return ctypes.string_at(llvm.LLVMGetBufferStart(out), llvm.LLVMGetBufferSize(out))


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        fail("usage: bcc_worker.py OUTPUT.o FUNCTIONS.json SOURCE.c [CFLAGS...]")
    output, functions, source, cflags = argv[0], argv[1], argv[2], argv[3:]
    try:
        from bcc.libbcc import lib
    except ImportError as e:
        fail(f"bcc is not installed for {sys.executable} ({e}): apt-get install python3-bpfcc")
    ir_path = output + ".ll"
    module = compile_module(lib, source, cflags, ir_path)
    try:
        with open(ir_path, "rb") as f:
            printed = f.read()
        start = printed.find(MAIN_MODULE)
        if start < 0:
            fail("bcc printed no module for the program")
        end = printed.find(b"; ModuleID = ", start + len(MAIN_MODULE))
        obj = emit_object(loaded_llvm(), printed[start:end if end > 0 else None])
        with open(output, "wb") as f:
            f.write(obj)
        with open(functions, "w") as f:
            json.dump(bcc_functions(lib, module), f)
    finally:
        lib.bpf_module_destroy(module)
        os.unlink(ir_path)


if __name__ == "__main__":
    main(sys.argv[1:])
