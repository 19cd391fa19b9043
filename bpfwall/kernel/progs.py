"""BPF programs: load (with the verifier's log on failure), describe, test-run; object ids;
`Program`, an open program with its info."""
from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass

from . import syscall as sc
from .errors import KernelError, VerifierError
from .fd import Fd, Object

# The verifier log is only asked for after a failure: logging slows verification.
# Its buffer grows until the whole log fits (the kernel answers ENOSPC until then).
_LOG_START = 1 << 18
_LOG_MAX = 1 << 28


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str              # hex of the kernel's hash of the instructions
    xlated_size: int      # bytes of the instructions as the kernel runs them
    jited_size: int       # bytes of native code (0 when not JIT-compiled)
    map_ids: tuple[int, ...]
    btf_id: int
    run_time_ns: int      # totals kept while sysctl kernel.bpf_stats_enabled=1
    run_cnt: int


def prog_load(prog_type: int, insns: bytes, license: str, expected_attach_type: int, name: str,
              btf_fd: int = 0, func_info: bytes = b"", line_info: bytes = b"") -> int:
    """A loaded program's fd.

    `func_info`/`line_info` are kernel-ready records (instruction indexes) that
    name the function and map instructions to source lines of the BTF at
    `btf_fd`; the verifier log then quotes the source.
    """
    insn_buf, lic = sc.buffer(insns), ctypes.create_string_buffer(license.encode())
    fi, li = sc.buffer(func_info), sc.buffer(line_info)
    attr = sc.ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=sc.addr(insn_buf),
                           license=sc.addr(lic), prog_name=name.encode()[:sc.BPF_OBJ_NAME_LEN - 1],
                           expected_attach_type=expected_attach_type)
    if btf_fd and func_info:
        attr.prog_btf_fd = btf_fd
        attr.func_info_rec_size, attr.func_info = sc.FUNC_INFO_REC_SIZE, sc.addr(fi)
        attr.func_info_cnt = len(func_info) // sc.FUNC_INFO_REC_SIZE
        if line_info:
            attr.line_info_rec_size, attr.line_info = sc.LINE_INFO_REC_SIZE, sc.addr(li)
            attr.line_info_cnt = len(line_info) // sc.LINE_INFO_REC_SIZE
    what = f"cannot load program {name!r}"
    try:
        return sc.bpf(sc.BPF_PROG_LOAD, attr, what)
    except KernelError as e:
        failure = e
    size = _LOG_START
    while True:
        log = ctypes.create_string_buffer(size)
        attr.log_level, attr.log_size, attr.log_buf = 1, size, sc.addr(log)
        try:
            return sc.bpf(sc.BPF_PROG_LOAD, attr, what)  # the first failure was transient
        except KernelError as e:
            if e.errno == errno.ENOSPC and size < _LOG_MAX:
                size *= 4
                continue
            text = log.value.decode(errors="replace")
            if not text.strip():
                raise failure from None
            raise VerifierError(e.errno, f"verifier rejected program {name!r}", text) from None


def prog_info(fd: int) -> ProgInfo:
    nr = 16
    while True:
        ids = (ctypes.c_uint32 * nr)()
        info = sc.ProgInfoStruct(nr_map_ids=nr, map_ids=sc.addr(ids))
        attr = sc.InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=sc.addr(info))
        sc.bpf(sc.BPF_OBJ_GET_INFO_BY_FD, attr, f"cannot get info of program fd {fd}")
        if info.nr_map_ids <= nr:
            break
        nr = info.nr_map_ids
    return ProgInfo(info.id, info.type, info.name.decode(), bytes(info.tag).hex(),
                    info.xlated_prog_len, info.jited_prog_len, tuple(ids[:info.nr_map_ids]),
                    info.btf_id, info.run_time_ns, info.run_cnt)


def prog_test_run(fd: int, data: bytes, repeat: int = 1, ifindex: int = 0) -> tuple[int, int]:
    """Run the program on `data` `repeat` times: (return value, mean duration in ns).

    cgroup_skb programs take an Ethernet frame: the kernel reads skb->protocol
    from its ethertype and hands the program the data after the 14-byte header.
    `ifindex` (> 1): the skb's device, of this thread's network namespace; else its loopback.
    """
    buf = sc.buffer(data)
    attr = sc.TestRunAttr(prog_fd=fd, data_size_in=len(data), data_in=sc.addr(buf), repeat=repeat)
    if ifindex:
        ctx = sc.buffer(bytes(sc.SKB_CTX_IFINDEX_OFFSET) + struct.pack("=I", ifindex))
        attr.ctx_size_in, attr.ctx_in = sc.SKB_CTX_SIZE, sc.addr(ctx)
    sc.bpf(sc.BPF_PROG_TEST_RUN, attr, f"cannot test-run program fd {fd}")
    return attr.retval, attr.duration


def test_run_limit(fd: int, data: bytes) -> int | None:
    """The longest prefix of `data` (in bytes) the kernel will test-run, when `data` is refused
    for its length alone; None when it is refused whatever its length (another reason).

    The kernel caps a test-run's input at a page less its skb head- and tailroom (3,712 bytes of
    frame on x86-64 with 4 KiB pages); the figure depends on the architecture and the kernel's
    struct sizes, so it is measured: a binary search over prefixes, ~12 runs."""
    def accepted(n: int) -> bool:
        try:
            prog_test_run(fd, data[:n])
            return True
        except KernelError as e:
            if e.errno != errno.EINVAL:
                raise
            return False

    low, high = 34, len(data)  # Ethernet + a minimal IPv4 header: the shortest the kernel runs
    if not accepted(low):
        return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if accepted(mid) else (low, mid)
    return low


def _next_id(cmd: int, start: int) -> int | None:
    attr = sc.GetIdAttr(start_id=start)
    try:
        sc.bpf(cmd, attr, f"cannot list ids after {start}")
    except KernelError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return attr.next_id


def prog_get_next_id(start: int) -> int | None:
    """The id of the loaded program after `start` (0: the first), or None at the end."""
    return _next_id(sc.BPF_PROG_GET_NEXT_ID, start)


def map_get_next_id(start: int) -> int | None:
    return _next_id(sc.BPF_MAP_GET_NEXT_ID, start)


def prog_get_fd_by_id(prog_id: int) -> int:
    return sc.bpf(sc.BPF_PROG_GET_FD_BY_ID, sc.GetIdAttr(start_id=prog_id),
                  f"cannot open program id {prog_id}")


def map_get_fd_by_id(map_id: int) -> int:
    return sc.bpf(sc.BPF_MAP_GET_FD_BY_ID, sc.GetIdAttr(start_id=map_id),
                  f"cannot open map id {map_id}")


class Program(Object):
    """An open program. Its info is read once: id, name, tag, sizes and maps are fixed for a
    program's life; read_info() gives fresh run counters. Owns its fd when given an Fd; given
    an int, it borrows it (the caller closes it)."""

    @classmethod
    def load(cls, *args, **kwargs) -> "Program":
        """prog_load()'s arguments; the program, owned."""
        return cls(Fd(prog_load(*args, **kwargs)))

    @classmethod
    def from_id(cls, prog_id: int) -> "Program":
        """Open program `prog_id` (needs CAP_SYS_ADMIN)."""
        return cls(Fd(prog_get_fd_by_id(prog_id)))

    def _read_info(self) -> ProgInfo:
        return prog_info(self.fileno())

    @property
    def id(self) -> int:
        return self.info.id

    def read_info(self) -> ProgInfo:
        """The info as it is now (run_time_ns, run_cnt), kept as the cached one too."""
        self._info = self._read_info()
        return self._info

    def test_run(self, data: bytes, repeat: int = 1) -> tuple[int, int]:
        """See prog_test_run(): (return value, mean duration in ns)."""
        return prog_test_run(self.fileno(), data, repeat)
