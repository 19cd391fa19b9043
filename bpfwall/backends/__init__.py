"""Backends that apply a unit policy: bpf (cgroup_skb programs); nft later."""
