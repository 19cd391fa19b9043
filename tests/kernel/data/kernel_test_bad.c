// SPDX-License-Identifier: GPL-2.0
/* Loads its map and ingress program, then the verifier rejects egress: it
 * reads packet data without checking data_end. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} kt_bad_map SEC(".maps");

SEC("cgroup_skb/ingress")
int kt_good(struct __sk_buff *skb)
{
	__u32 key = 0;

	return bpf_map_lookup_elem(&kt_bad_map, &key) != 0;
}

SEC("cgroup_skb/egress")
int kt_bad(struct __sk_buff *skb)
{
	__u8 *ip = (void *)(long)skb->data;

	return ip[9] == 17;
}

char _license[] SEC("license") = "GPL";
