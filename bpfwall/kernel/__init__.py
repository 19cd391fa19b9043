"""bpfwall's kernel layer: bpf(2) through ctypes, our own ELF/BTF loader, pins and cgroup attach.

It knows nothing of the filter language. Modules, bottom up:
  errors   KernelError (errno + one-line message), VerifierError (.log), NotBpffs
  fd       Fd: an fd that closes itself (with, close() once, release(), borrow()); Object
  syscall  bpf(2)/statfs(2), constants, attr layouts, possible_cpus()
  maps     create, lookup/update/delete, iterate, info; Map: an open map, info cached, per-CPU values
  progs    load (verifier log on failure), info, test run, object ids; Program: an open program
  btf      parse, fix up an object's BTF, load it, BTF-defined map definitions
  elf      read_object(): an ELF object as plain, picklable data
  loader   load(): BTF, maps (or reused ones), programs with map fds patched in
  safefs   paths walked from / through checked dir fds; checked files, atomic writes
  pins     bpffs pins, atomic replacement
  cgroup   cgroup2 discovery, attach/detach/query with BPF_F_ALLOW_MULTI, walks
"""
