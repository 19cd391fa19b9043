// SPDX-License-Identifier: GPL-2.0
/* bench/event_parts.py: each part of a drop event alone, in a cgroup_skb program of its own
 * (-DPART_<name>), so that its cost beside the empty program is the floor of what an event can
 * cost on this machine. The record is port_filter.c's size (64 bytes). */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct record { __u64 w[8]; };

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} ep_ring SEC(".maps");

struct locked { struct bpf_spin_lock lock; __u32 pad; __u64 n; };

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct locked);
} ep_value SEC(".maps");

SEC("cgroup_skb/ingress")
int ep(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct locked *v = bpf_map_lookup_elem(&ep_value, &zero);
	struct record *r __attribute__((unused));  /* the ring parts use it */

	if (!v)
		return 1;
#if defined(PART_lookup)
	v->pad++;                                          /* the map lookup alone */
#elif defined(PART_coarse_clock)
	v->n = bpf_ktime_get_coarse_ns();
#elif defined(PART_jiffies)
	v->n = bpf_jiffies64();
#elif defined(PART_clock)
	v->n = bpf_ktime_get_ns();
#elif defined(PART_cgroup_id)
	v->n = bpf_skb_cgroup_id(skb);
#elif defined(PART_spin_lock)
	bpf_spin_lock(&v->lock);
	v->n++;
	bpf_spin_unlock(&v->lock);
#elif defined(PART_cmpxchg)
	__sync_val_compare_and_swap(&v->n, v->n, v->n + 1);
#elif defined(PART_reserve_submit)
	r = bpf_ringbuf_reserve(&ep_ring, sizeof(*r), 0);
	if (r)
		bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
#elif defined(PART_reserve_fill_submit)
	r = bpf_ringbuf_reserve(&ep_ring, sizeof(*r), 0);
	if (r) {
		for (int i = 0; i < 8; i++)
			r->w[i] = i;
		bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	}
#elif defined(PART_output)
	struct record s = {};
	bpf_ringbuf_output(&ep_ring, &s, sizeof(s), BPF_RB_NO_WAKEUP);
#elif defined(PART_submit_wakeup)
	r = bpf_ringbuf_reserve(&ep_ring, sizeof(*r), 0);
	if (r)
		bpf_ringbuf_submit(r, BPF_RB_FORCE_WAKEUP);
#endif
	return 1;
}

char _license[] SEC("license") = "GPL";
