"""nftables side of bpfwall: names, JSON building blocks, the libnftables runner
(in a private mount namespace on hybrid cgroup hosts), table layout, state file, guard."""
