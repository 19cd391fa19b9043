// SPDX-License-Identifier: GPL-2.0
/* A cgroup_skb program that writes one record per packet to a ring buffer
 * (the packet's length and a running count), for the ring buffer reader's tests. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct record {
	__u32 len;
	__u32 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16384);
} kt_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} kt_seq SEC(".maps");

SEC("cgroup_skb/egress")
int kt_ringbuf(struct __sk_buff *skb)
{
	__u32 zero = 0;
	__u32 *seq = bpf_map_lookup_elem(&kt_seq, &zero);
	struct record r = { .len = skb->len };

	if (!seq)
		return 1;
	r.seq = *seq;  /* test runs are sequential: no atomics needed */
	*seq = r.seq + 1;
	bpf_ringbuf_output(&kt_events, &r, sizeof(r), 0);
	return 1;
}

char _license[] SEC("license") = "GPL";
