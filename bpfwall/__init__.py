"""bpfwall: a per-unit eBPF firewall for systemd units."""

__version__ = "0.1.0"
