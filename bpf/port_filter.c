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
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
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

/* The unit's filter: its params struct, its @set maps with their lookup helpers
 * (in_number_set, in_address_set: only those its sets need) and the two verdict
 * functions. */
#include "bpfwall_filter.h"

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
	__u64 time_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
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

/* The token bucket of one direction. Shared by all CPUs, so taken under the lock; tokens are
 * counted in events × NSEC_PER_SEC so that refilling is one multiplication. */
#define NSEC_PER_SEC 1000000000ULL
#define BUCKET_FULL_AFTER_NS (1ULL << 40)  /* ~18 min: refills to the full burst; keeps ns × rate < 2^64 */
#define LOG_LIMIT_MAX 1000000              /* rate and burst: larger values are refused by Python */
struct bpfwall_log_limit {
	struct bpf_spin_lock lock;
	__u32 rate;           /* events per second; 0: no events */
	__u64 burst;          /* events the bucket holds */
	__u64 tokens;         /* events × NSEC_PER_SEC */
	__u64 last_ns;        /* time of the last refill; 0 after Python wrote rate/burst */
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

/* 1: log it, 0: over the limit, -1: events off.
 *
 * The lock costs ~50 ns (it disables interrupts), more than the rest of the drop path, so a
 * flood's usual answer — no token — is found without it: from a racy read that can only err
 * towards "no token" (a loss, counted) in a race with another CPU's refill, never towards an
 * event the limit does not allow: those are granted under the lock alone. */
static __always_inline int take_token(struct bpfwall_log_limit *l, __u64 now)
{
	__u64 tokens, cap, last, elapsed;
	int ok;

	last = *(volatile __u64 *)&l->last_ns;
	if (last && now >= last && now - last < BUCKET_FULL_AFTER_NS &&
	    *(volatile __u64 *)&l->tokens + (now - last) * l->rate < NSEC_PER_SEC)
		return 0;
	bpf_spin_lock(&l->lock);
	cap = l->burst * NSEC_PER_SEC;
	last = l->last_ns;
	/* another CPU may have refilled at a later `now` since ours was read: no time elapsed */
	elapsed = now > last ? now - last : 0;
	if (!last || elapsed >= BUCKET_FULL_AFTER_NS)
		tokens = cap;
	else
		tokens = l->tokens + elapsed * l->rate;
	if (tokens > cap)
		tokens = cap;
	ok = tokens >= NSEC_PER_SEC;
	if (ok)
		tokens -= NSEC_PER_SEC;
	l->tokens = tokens;
	if (now > last)
		l->last_ns = now;
	bpf_spin_unlock(&l->lock);
	return ok;
}

static __always_inline void log_drop(struct __sk_buff *skb, const struct pkt *p, __u32 dir, __u32 verdict)
{
	struct bpfwall_log_limit *l = bpf_map_lookup_elem(&log_limit, &dir);
	struct bpfwall_event *e;
	__u64 *lost;
	int ok;

	if (!l || !l->rate)  /* events off */
		return;
	/* The bucket needs no better than the tick (the coarse clock is a read, not a clock
	 * source access); the record gets the precise time, paid only when it is written. */
	ok = take_token(l, bpf_ktime_get_coarse_ns());
	if (ok < 0)
		return;
	if (ok) {
		e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
		if (e) {
			e->time_ns = bpf_ktime_get_ns();
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
			bpf_ringbuf_submit(e, 0);
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

static __always_inline int run(struct __sk_buff *skb, __u32 dir)
{
	struct pkt p = {};
	const struct bpfwall_params *prm = 0;
	int pass;

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

char _license[] SEC("license") = "GPL";
