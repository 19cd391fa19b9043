// SPDX-License-Identifier: GPL-2.0
/* Uses a global variable (in .bss): the loader must refuse it by name. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

__u64 kt_hits;

SEC("cgroup_skb/ingress")
int kt_global(struct __sk_buff *skb)
{
	kt_hits++;
	return 1;
}

char _license[] SEC("license") = "GPL";
