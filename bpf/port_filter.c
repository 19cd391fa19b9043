// SPDX-License-Identifier: GPL-2.0
/*
 * bpfwall's cgroup_skb program: parse the IP header chain of a packet, run the
 * unit's filter on the parsed fields, count the verdict, return 1 (pass) or
 * 0 (drop).
 *
 * The filter itself comes from "bpfwall_filter.h", which bpfwall generates
 * from the type-checked AST of the unit's expressions (never from their
 * text). It defines:
 *   struct bpfwall_params       one u64 member per $param
 *   BPFWALL_META_SIZE           bytes of the self-description kept in `meta`
 *   BPFWALL_HAS_PARAMS          1 when a filter reads $params
 *   BPFWALL_HAS_IFNAME          1 when a filter reads ifname: the `ifaces` map and
 *                               interfaces_of(skb), the bits of its device's names
 *   set_<name> maps             one per @set, and the helpers that look them up
 *   bpfwall_filter_ingress/egress(p, prm)  the two verdict functions
 *
 * Field semantics are the ones of bpfwall/lang/packet.py (the reference
 * evaluator); tests compare the two on generated packets. The maps, keys and
 * values Python reads and writes are stated in bpfwall/program_contract.py;
 * tests/unit/test_program_contract.py checks the two against each other.
 *
 * No global data: everything lives in maps, so the object needs no .data /
 * .rodata relocations and one ELF loads twice into independent units.
 *
 * Batches (bpfwall/batch.py): to save a compiler run per unit, many units are
 * compiled as one translation unit that includes this file first with
 * BPFWALL_SHARED_ONLY (the part every unit shares, below up to the filter
 * header), then once per unit with BPFWALL_FILTER_H naming the unit's header and
 * every name of the unit's part prefixed by a macro (batch.UNIT_NAMES); the ELF
 * reader takes each unit's programs, maps and BTF apart by that prefix.
 */
#ifndef BPFWALL_SHARED_DONE  /* what every unit shares: once per translation unit */
#define BPFWALL_SHARED_DONE
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#ifdef BPFWALL_BCC
/* Compiled by bcc (bpfwall/bcc_build.py): bcc includes its own helper declarations first,
 * which libbpf's would contradict; what this file takes from libbpf's header is this. */
#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#else
#include <bpf/bpf_helpers.h>
#endif
#include <bpf/bpf_endian.h>

#define NO_PROTO 0xffff        /* proto of a packet whose L4 protocol is unknown */
#define MAX_EXT_HEADERS 8      /* IPv6 extension headers walked before giving up */
#define EVENTS_RING_BYTES (64 * 1024)  /* program_contract.EVENTS_RING_BYTES */
#ifndef BPFWALL_ONLY_LOAD_BYTES
#define DIRECT_MAX_OFF 0x7f00  /* larger offsets go through bpf_skb_load_bytes */
#else
#define DIRECT_MAX_OFF 0       /* tests: every read takes the fallback path */
#endif

enum { DIR_INGRESS = 0, DIR_EGRESS = 1 };
enum { MODE_ENFORCE = 0, MODE_AUDIT = 1 };

struct pkt {
	__u32 len;            /* bytes of the L3 packet */
	__u16 proto;          /* final L4 protocol, NO_PROTO when unknown */
	__u8 family;          /* 4 or 6 */
	__u8 is_icmp;         /* ICMP on v4, ICMPv6 on v6 */
	__u16 sport, dport;   /* host order; 0 when absent */
	__u8 icmp_type, icmp_code;
	__u32 saddr[4];       /* network order words; IPv4 uses [0] */
	__u32 daddr[4];
	__u64 ifaces;         /* bits of the unit's interface names the packet's device matches */
};

struct bpfwall_counter {
	__u64 packets;
	__u64 bytes;
};

/* Key of an address-set trie: the family byte keeps v4 and v6 entries apart
 * exactly (no ::ffff: mapping), so prefixlen counts it: 8 + address prefix. */
struct bpfwall_addr_key {
	__u32 prefixlen;
	__u8 family;
	__u8 addr[16];
} __attribute__((packed));
#define ADDR_KEY_PREFIXLEN(bits) (8 + (bits))

/* Key of the `ifaces` map (units that read ifname): a device is its network namespace's
 * cookie and its ifindex, which is only unique within the namespace. */
struct bpfwall_iface_key {
	__u64 netns;
	__u32 ifindex;
	__u32 pad;
};

/* Index = direction * 2 + dropped. Per direction so that softirq ingress and
 * process-context egress never increment the same per-CPU slot. */
#define COUNTER_SLOT(dir, dropped) ((dir) * 2 + (dropped))

/* Bytes are read straight from the linear area when they are there and through
 * bpf_skb_load_bytes otherwise, so a header outside the linear part (GSO, large
 * packets) is still read, never guessed. Each returns 0 when the bytes exist.
 * data/data_end are read once into the cursor: clang would otherwise fold the
 * ctx offsets into a pointer the verifier refuses ("modified ctx ptr"). */
struct cursor {
	struct __sk_buff *skb;
	void *data;
	void *end;
};

#define DEFINE_LOAD(name, type)                                                \
static __always_inline int name(const struct cursor *c, __u32 off, type *out)  \
{                                                                              \
	if (off < DIRECT_MAX_OFF) {                                            \
		void *p = c->data + off;                                       \
		if (p + sizeof(*out) <= c->end) {                              \
			*out = *(type *)p;                                     \
			return 0;                                              \
		}                                                              \
	}                                                                      \
	return bpf_skb_load_bytes(c->skb, off, out, sizeof(*out));             \
}
DEFINE_LOAD(load_u16, __u16)
DEFINE_LOAD(load_u32, __u32)

/* The fixed IPv4 header: 20 bytes at offset 0. */
struct v4_fixed {
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag;
	__u8 ttl;
	__u8 proto;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
};

/* The fixed IPv6 header: 40 bytes at offset 0. */
struct v6_fixed {
	__u32 ver_tc_flow;
	__u16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* A pointer to the fixed header: straight into the packet when it is in the
 * linear area (typed loads, no copy), else to a stack copy. */
#define FIXED_HEADER(c, type, buf)                                             \
	({                                                                     \
		const type *_h = (c)->data;                                    \
		if (!DIRECT_MAX_OFF || (void *)(_h + 1) > (c)->end) {          \
			_h = 0;                                                \
			if (!bpf_skb_load_bytes((c)->skb, 0, (buf), sizeof(type))) \
				_h = (buf);                                    \
		}                                                              \
		_h;                                                            \
	})

/* Returns the L4 offset when the first fragment's L4 header is where the ports
 * are, or -1 when there is no L4 header to read (non-first fragment, unknown
 * protocol). Sets p->proto. */
static __always_inline int parse_v4(const struct cursor *c, struct pkt *p)
{
	struct v4_fixed buf;
	const struct v4_fixed *h = FIXED_HEADER(c, struct v4_fixed, &buf);
	__u32 ihl;

	if (!h)
		return -1;
	p->saddr[0] = h->saddr;
	p->daddr[0] = h->daddr;
	ihl = h->ver_ihl & 0xf;
	if (ihl < 5 || ihl * 4 > p->len)
		return -1;
	p->proto = h->proto;
	if (h->frag & bpf_htons(0x1fff))
		return -1;
	return ihl * 4;
}

/* IPv6 extension headers bpfwall walks, as a mask of next-header values (all < 64). */
#define EXT_HEADERS (1ULL << IPPROTO_HOPOPTS | 1ULL << IPPROTO_ROUTING | 1ULL << IPPROTO_DSTOPTS | \
		     1ULL << IPPROTO_AH | 1ULL << IPPROTO_FRAGMENT)

/* 1 when x == k, else 0, without a branch (BPF has no setcc; see parse_v6). The
 * barriers keep clang from seeing through it and branching after all. */
static __always_inline __u64 same(__u64 x, __u64 k)
{
	__u64 d = x ^ k;

	asm volatile("" : "+r"(d));
	d = (d - 1) >> 63;
	asm volatile("" : "+r"(d));
	return d;
}

static __always_inline int parse_v6(const struct cursor *c, struct pkt *p)
{
	struct v6_fixed buf;
	const struct v6_fixed *h = FIXED_HEADER(c, struct v6_fixed, &buf);
	__u32 off = 40;
	__u8 nh;

	if (!h)
		return -1;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		p->saddr[i] = h->saddr[i];
		p->daddr[i] = h->daddr[i];
	}
	nh = h->nexthdr;
	/* One path per iteration for every kind of extension header: the kind only
	 * enters arithmetic (same(), a bit mask), the fragment check only exits. With
	 * a branch per kind the verifier walked every sequence of kinds (~15,000
	 * instructions per program, most of a unit's load time); this way ~1,300.
	 * Extension headers are read with bpf_skb_load_bytes: they are rare, and a
	 * direct read would split each iteration in two again. */
	for (int i = 0; i <= MAX_EXT_HEADERS; i++) {
		__u64 kind = nh, ah, frag, len;
		__u16 w;       /* next header, header length */
		__u8 tail[6];  /* the rest of a fragment header: offset and flags, id */

		if (kind >= 64 || !((EXT_HEADERS >> kind) & 1)) {
			p->proto = nh;
			return off;
		}
		if (i == MAX_EXT_HEADERS || bpf_skb_load_bytes(c->skb, off, &w, sizeof(w)))
			return -1;
		ah = same(kind, IPPROTO_AH);
		frag = same(kind, IPPROTO_FRAGMENT);
		/* (len + 1) * 8 bytes; AH (len + 2) * 4; a fragment header 8 */
		len = ((w >> 8) * (1 - frag) + 1 + ah) << (3 - ah);
		asm volatile("" : "+r"(len));  /* computed here, before the fragment branch */
		nh = w & 0xff;
		if (frag) {
			/* fails unless all 8 bytes are there */
			if (bpf_skb_load_bytes(c->skb, off + 2, tail, sizeof(tail)))
				return -1;
			if ((tail[0] << 8 | tail[1]) & 0xfff8) {  /* fragment offset != 0 */
				p->proto = nh;
				return -1;
			}
		}
		off += len;
	}
	return -1;  /* not reached: the last iteration returns in every case */
}

static __always_inline void parse(struct __sk_buff *skb, struct pkt *p)
{
	struct cursor cur = {
		.skb = skb,
		.data = (void *)(long)skb->data,
		.end = (void *)(long)skb->data_end,
	};
	const struct cursor *c = &cur;
	int l4;

	p->len = skb->len;
	p->proto = NO_PROTO;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		p->family = 4;
		l4 = parse_v4(c, p);
		p->is_icmp = p->proto == IPPROTO_ICMP;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		p->family = 6;
		l4 = parse_v6(c, p);
		p->is_icmp = p->proto == IPPROTO_ICMPV6;
	} else {
		return;
	}
	if (l4 < 0)
		return;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__u32 w;
		if (load_u32(c, l4, &w) == 0) {
			p->sport = bpf_ntohs(w & 0xffff);
			p->dport = bpf_ntohs(w >> 16);
		}
	} else if (p->is_icmp) {
		__u16 w;
		if (load_u16(c, l4, &w) == 0) {
			p->icmp_type = w & 0xff;
			p->icmp_code = w >> 8;
		}
	}
}

#if defined(BPFWALL_KFUNC_CAST_TO_KERN_CTX) && !defined(BPFWALL_BCC)
/* The socket's cgroup id in four loads, without a helper call: on this kind of CPU every `ret`
 * goes through a mitigation thunk, and bpf_skb_cgroup_id() cost the slice guard ~7 ns a packet
 * against ~3 ns this way (bpfwall/kernel/vmlinux.py). The kfunc bpf_cast_to_kern_ctx() gives
 * the kernel's sk_buff (the verifier turns the call into a register move; the loader puts in
 * the kfunc's BTF id for the placeholder number); build.py takes the offsets from the running
 * kernel's BTF. The verifier checks each load against that BTF, so a wrong offset cannot load.
 * Same value as the helper: while cgroup programs run, skb->sk is the full socket whose
 * cgroup's programs these are. A NULL on the way reads as 0: unknown cgroup. */
static void *(*const bpfwall_cast_to_kern_ctx)(void *ctx) = (void *)BPFWALL_KFUNC_CAST_TO_KERN_CTX;

static __always_inline __u64 socket_cgroup_id(struct __sk_buff *skb)
{
	char *kskb = bpfwall_cast_to_kern_ctx(skb);
	char *sk = *(char **)(kskb + BPFWALL_OFF_SKB_SK);
	char *cgrp, *kn;

	if (!sk)
		return 0;
	cgrp = *(char **)(sk + BPFWALL_OFF_SOCK_CGROUP);
	kn = *(char **)(cgrp + BPFWALL_OFF_CGROUP_KN);
	return *(__u64 *)(kn + BPFWALL_OFF_KERNFS_NODE_ID);
}
#else
#define socket_cgroup_id bpf_skb_cgroup_id
#endif

#endif /* BPFWALL_SHARED_DONE */
#ifndef BPFWALL_SHARED_ONLY

/* Everything from here on is the unit's own: in a batch it is included once per
 * unit, each time with its names prefixed (see the top of this file). */

/* The unit's filter: its params struct, its @set maps with their lookup helpers
 * (in_number_set, in_address_set: only those its sets need) and the two verdict
 * functions. A batch names each unit's header in BPFWALL_FILTER_H. */
#ifdef BPFWALL_FILTER_H
#include BPFWALL_FILTER_H
#else
#include "bpfwall_filter.h"
#endif

/* Per-CPU {packets, bytes}, indexed by COUNTER_SLOT. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, struct bpfwall_counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} mode SEC(".maps");

/* Not read by the programs: a JSON description of the unit (expressions,
 * param slots, set kinds) so that stats/set/tune work from the pins alone. */
struct bpfwall_meta {
	char json[BPFWALL_META_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpfwall_meta);
} meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bpfwall_params);
} params SEC(".maps");

/* Drop events: one record per dropped (or, in audit mode, would-be dropped) packet, into the
 * unit's ring buffer, read by `bpfwall monitor` and the watcher. Only the drop path reaches
 * this code: a passing packet's cost does not change. */
struct bpfwall_event {
	__u64 time_ns;        /* jiffies × jiffy_ns; + log_limit's clock_offset_ns: CLOCK_MONOTONIC_COARSE */
	__u64 cgroup_id;      /* the socket's cgroup (bpf_skb_cgroup_id) */
	__u32 len;
	__u16 proto;          /* NO_PROTO when unknown */
	__u16 sport, dport;
	__u8 family;
	__u8 direction;       /* DIR_INGRESS / DIR_EGRESS */
	__u8 verdict;         /* MODE_ENFORCE: dropped, MODE_AUDIT: would have been */
	__u8 is_icmp;
	__u8 icmp_type, icmp_code;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* Per unit: records are small and a unit's own ring needs no unit identifier; see
 * program_contract.EVENTS_RING_BYTES for the size. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_BYTES);
} events SEC(".maps");

/* The rate limit of one direction, a GCRA (the token bucket as one time, so that one
 * compare-and-swap takes a token: no lock). `tat` runs ahead of now by interval_ns per event
 * granted and may lead it by at most tolerance_ns: at most burst events at once, then one per
 * interval. Python writes rate, burst, interval_ns = ceil(1e9 / rate), tolerance_ns =
 * (burst - 1) × interval_ns and jiffy_ns, and zeroes the rest (a full bucket); see
 * program_contract.LogLimit.
 *
 * The clock is bpf_jiffies64() × jiffy_ns (the tick's length): ~1 ns, where even the coarse
 * clock costs ~13 ns here and bpf_ktime_get_ns() ~30, most of an event's cost. Records carry
 * that time; when the program wakes the reader (at most every WAKE_EVERY_NS) it also stores
 * CLOCK_MONOTONIC_COARSE minus it, which user space adds. */
#define LOG_LIMIT_MAX 1000000  /* rate and burst: larger values are refused by Python (tolerance_ns < 2^60) */
struct bpfwall_log_limit {
	__u32 rate;           /* events per second; 0: no events */
	__u32 burst;          /* events at once */
	__u64 interval_ns;
	__u64 tolerance_ns;
	__u64 jiffy_ns;
	__u64 tat;            /* the earliest time the bucket is full again */
	__u64 woken_ns;       /* when the program last woke the ring's reader */
	__u64 clock_offset_ns;  /* CLOCK_MONOTONIC_COARSE − this clock, at woken_ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct bpfwall_log_limit);
} log_limit SEC(".maps");

/* Events lost to the limit or to a full ring, per direction (per CPU: no atomics). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} events_lost SEC(".maps");

/* 1: a token, 0: over the limit (or lost a race twice: a counted loss like the limit's). */
static __always_inline int take_token(struct bpfwall_log_limit *l, __u64 now)
{
	__u64 tat = *(volatile __u64 *)&l->tat, seen, base;

#pragma unroll
	for (int i = 0; i < 2; i++) {
		base = tat > now ? tat : now;
		if (base - now > l->tolerance_ns)
			return 0;
		seen = __sync_val_compare_and_swap(&l->tat, tat, base + l->interval_ns);
		if (seen == tat)
			return 1;
		tat = seen;
	}
	return 0;
}

/* Waking the reader costs microseconds (an IPI: ~5 µs on this VM, against ~30 ns for the
 * record), so the program wakes it at most every WAKE_EVERY_NS and the reader polls on its
 * own while events come (bpf_events.py: it stays awake longer than this plus a tick, so no
 * record waits unseen). */
#define WAKE_EVERY_NS (10 * 1000 * 1000ULL)  /* program_contract.WAKE_EVERY_NS */

static __always_inline void log_drop(struct __sk_buff *skb, const struct pkt *p, __u32 dir, __u32 verdict)
{
	struct bpfwall_log_limit *l = bpf_map_lookup_elem(&log_limit, &dir);
	struct bpfwall_event *e;
	__u64 *lost, now, flags = BPF_RB_NO_WAKEUP;

	if (!l || !l->rate)  /* events off */
		return;
	now = bpf_jiffies64() * l->jiffy_ns;
	if (take_token(l, now)) {
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (e) {
			e->time_ns = now;
			e->cgroup_id = bpf_skb_cgroup_id(skb);
			e->len = p->len;
			e->proto = p->proto;
			e->sport = p->sport;
			e->dport = p->dport;
			e->family = p->family;
			e->direction = dir;
			e->verdict = verdict;
			e->is_icmp = p->is_icmp;
			e->icmp_type = p->icmp_type;
			e->icmp_code = p->icmp_code;
			__builtin_memcpy(e->saddr, p->saddr, sizeof(e->saddr));
			__builtin_memcpy(e->daddr, p->daddr, sizeof(e->daddr));
			if (now - l->woken_ns >= WAKE_EVERY_NS) {
				l->clock_offset_ns = bpf_ktime_get_coarse_ns() - now;  /* one store: read whole */
				l->woken_ns = now;
				flags = BPF_RB_FORCE_WAKEUP;
			}
			bpf_ringbuf_submit(e, flags);
			return;
		}
	}
	lost = bpf_map_lookup_elem(&events_lost, &dir);
	if (lost)
		*lost += 1;
}

static __always_inline int finish(struct __sk_buff *skb, const struct pkt *p, __u32 dir, int pass)
{
	__u32 idx = COUNTER_SLOT(dir, !pass);
	__u32 zero = 0, verdict;
	struct bpfwall_counter *c;
	__u32 *m;

	c = bpf_map_lookup_elem(&counters, &idx);
	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
	if (pass)
		return 1;
	m = bpf_map_lookup_elem(&mode, &zero);
	verdict = m && *m == MODE_AUDIT ? MODE_AUDIT : MODE_ENFORCE;
	log_drop(skb, p, dir, verdict);
	return verdict == MODE_AUDIT;
}

#ifdef BPFWALL_SLICE_GUARD
/* A slice default (README, "Slice defaults in the kernel"): this program sits on a slice and
 * judges only the packets no deeper filter judges. The watcher classifies each descendant
 * cgroup: GUARD_CLASSIFIED plus GUARD_BELOW(dir) for each direction a deeper filter judges (its
 * unit's own, a hand-off, a nested slice's default): those packets pass here untouched and
 * uncounted. A cgroup the watcher has not classified yet: if its nearest classified ancestor
 * hands the direction below, so is it (a unit's sub-cgroup); else this default judges it, or
 * under BPFWALL_STRICT it is dropped.
 *
 * Where a class is kept: `guard`, an array indexed by the id's low bits whose slot holds the id
 * (an inlined array lookup: a hash lookup cost ~18 ns a packet here, more than a unit's whole
 * filter), and `guard_more`, a hash for ids whose slot another id holds. */
#define GUARD_SLOTS 16384          /* program_contract.GUARD_SLOTS, a power of 2 */
#define GUARD_CAPACITY 65536       /* program_contract.GUARD_CAPACITY */
#define GUARD_MAX_LEVELS 32        /* cgroup levels walked for an unclassified cgroup */
#define GUARD_BELOW(dir) (1U << (dir))
#define GUARD_CLASSIFIED (1U << 2)

struct guard_slot {
	__u64 cgroup_id;   /* 0: free */
	__u32 class_bits;  /* GUARD_CLASSIFIED | GUARD_BELOW(dir)… */
	__u32 unused;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GUARD_SLOTS);
	__type(key, __u32);
	__type(value, struct guard_slot);
} guard SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, GUARD_CAPACITY);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} guard_more SEC(".maps");

/* 1 and *class when the cgroup is classified */
static __always_inline int guard_lookup(__u64 id, __u32 *class)
{
	__u32 i = id & (GUARD_SLOTS - 1);
	struct guard_slot *s = bpf_map_lookup_elem(&guard, &i);
	__u32 *v;

	if (s && s->cgroup_id == id) {
		*class = s->class_bits;
		return 1;
	}
	v = bpf_map_lookup_elem(&guard_more, &id);
	if (v) {
		*class = *v;
		return 1;
	}
	return 0;
}

static __always_inline __u32 guard_class(struct __sk_buff *skb)
{
	__u32 class = 0, nearest = 0;

	if (guard_lookup(socket_cgroup_id(skb), &class))  /* the usual case */
		return class;
	/* Born since the watcher looked: its ancestors, root first (the kernel gives them by
	 * level; classes exist only below the slice); the deepest classified one speaks for it. */
	for (int level = 1; level < GUARD_MAX_LEVELS; level++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, level);

		if (!id)
			break;
		if (guard_lookup(id, &class))
			nearest = class;
	}
	return nearest & (GUARD_BELOW(DIR_INGRESS) | GUARD_BELOW(DIR_EGRESS));  /* not classified itself */
}
#endif

static __always_inline int run(struct __sk_buff *skb, __u32 dir)
{
	struct pkt p = {};
	const struct bpfwall_params *prm = 0;
	int pass;

#ifdef BPFWALL_SLICE_GUARD
	__u32 class = guard_class(skb);

	if (class & GUARD_BELOW(dir))
		return 1;  /* judged by a deeper filter alone */
#ifdef BPFWALL_STRICT
	if (!(class & GUARD_CLASSIFIED)) {  /* not classified yet: nothing passes until it is */
		parse(skb, &p);
		return finish(skb, &p, dir, 0);
	}
#endif
#endif
	parse(skb, &p);
#if BPFWALL_HAS_IFNAME
	p.ifaces = interfaces_of(skb);
#endif
#if BPFWALL_HAS_PARAMS
	__u32 zero = 0;
	prm = bpf_map_lookup_elem(&params, &zero);
	if (!prm)  /* cannot happen for an array; fail closed if it ever does */
		return finish(skb, &p, dir, 0);
#endif
	if (dir == DIR_INGRESS)
		pass = bpfwall_filter_ingress(&p, prm);
	else
		pass = bpfwall_filter_egress(&p, prm);
	return finish(skb, &p, dir, pass);
}

SEC("cgroup_skb/ingress")
int bpfwall_ingress(struct __sk_buff *skb)
{
	return run(skb, DIR_INGRESS);
}

SEC("cgroup_skb/egress")
int bpfwall_egress(struct __sk_buff *skb)
{
	return run(skb, DIR_EGRESS);
}

#ifdef BPFWALL_BCC
#define BPF_LICENSE GPL  /* bcc writes the license section itself */
#else
char _license[] SEC("license") = "GPL";
#endif
#endif /* BPFWALL_SHARED_ONLY */
