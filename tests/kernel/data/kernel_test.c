// SPDX-License-Identifier: GPL-2.0
/* A tiny cgroup_skb object for the kernel layer's tests: passes UDP over IPv4
 * (1), drops everything else (0), counts verdicts per direction in a per-CPU
 * array and touches a hash and an LPM trie so that every map kind we load is
 * created, relocated and exercised. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

struct counter {
	__u64 packets;
	__u64 bytes;
};

struct addr_key {
	__u32 prefixlen;
	__u8 family;
	__u8 addr[16];
} __attribute__((packed));

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct counter);
} kt_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u8);
} kt_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr_key);
	__type(value, __u8);
} kt_nets SEC(".maps");

static __always_inline int verdict(struct __sk_buff *skb, __u32 dir)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	__u8 *ip = data;
	struct addr_key key = {.prefixlen = 8 + 32, .family = 4};
	__u32 port = 0;
	__u32 idx;
	int pass = 0;
	struct counter *c;

	if (ip + 20 <= (__u8 *)end && (ip[0] >> 4) == 4) {
		pass = ip[9] == IPPROTO_UDP;
		__builtin_memcpy(key.addr, ip + 16, 4);
		if (bpf_map_lookup_elem(&kt_nets, &key))
			pass = 0;
		if (bpf_map_lookup_elem(&kt_ports, &port))
			pass = 0;
	}
	idx = dir * 2 + !pass;
	c = bpf_map_lookup_elem(&kt_counters, &idx);
	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
	return pass;
}

SEC("cgroup_skb/ingress")
int kt_ingress(struct __sk_buff *skb)
{
	return verdict(skb, 0);
}

SEC("cgroup_skb/egress")
int kt_egress(struct __sk_buff *skb)
{
	return verdict(skb, 1);
}

char _license[] SEC("license") = "GPL";
