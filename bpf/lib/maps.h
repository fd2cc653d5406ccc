/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* The maps shared by every Veil program.
 *
 * Each entry object (veil_pod.c, veil_tun.c) includes this header; build.rs
 * links the two objects into one with `bpftool gen object`. The definitions
 * are __weak so that the libbpf static linker merges the two identical
 * copies into one map instead of rejecting a duplicate strong symbol; the
 * loaded programs therefore share every map without pinning to bpffs. */
#ifndef VEIL_MAPS_H
#define VEIL_MAPS_H

#include "common.h"

/* IPv6 as is, IPv4 as IPv4-mapped ::ffff:a.b.c.d (RFC 4291 2.5.5.2). */
struct addr16 {
	__u8 b[16];
};

struct endpoint_value {
	__u32 identity;
	__u32 ifindex; /* host-side veth */
	__u8 mac[6];   /* the pod's eth0 MAC, zero if not learned yet */
	__u8 flags;
	__u8 pad;
};

struct remote_key {
	__u32 prefixlen; /* LPM: +96 for IPv4 prefixes */
	__u8 addr[16];
};

struct remote_value {
	__u32 flags; /* REMOTE_HAS_PEER */
	__u32 node_id;
};

struct config_value {
	__u32 flags; /* CFG_ENABLED | CFG_STRICT */
	__u32 tun_ifindex;
	__u16 mss_v4;
	__u16 mss_v6;
	__u32 pad;
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct addr16);
	__type(value, struct endpoint_value);
} veil_endpoints SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct remote_key);
	__type(value, struct remote_value);
} veil_remote SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	/* Sized for a large cluster; not preallocated so that many agents on a
	 * test host do not each pin megabytes of kernel memory. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr16);
	__type(value, __u32);
} veil_ipcache SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config_value);
} veil_config SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, METRICS_MAX);
	__type(key, __u32);
	__type(value, struct metrics_value);
} veil_metrics SEC(".maps") __weak;

static __always_inline struct config_value *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&veil_config, &zero);
}

/* Counts one packet of skb under the outcome `code` (FWD_* or DROP_*). */
static __always_inline void metrics_count(struct __sk_buff *skb, int code)
{
	__u32 idx = code < 0 ? (__u32)(-code) : (__u32)code;
	struct metrics_value *m;

	m = bpf_map_lookup_elem(&veil_metrics, &idx);
	if (m) {
		/* Per-CPU slot: no other writer, plain adds are race free. */
		m->packets += 1;
		m->bytes += skb->len;
	}
}

/* Drops the packet and counts why (cilium's send_drop_notify, minus the
 * perf event). */
static __always_inline int drop(struct __sk_buff *skb, int code)
{
	metrics_count(skb, code);
	return TC_ACT_SHOT;
}

static __always_inline __u32 identity_mark(__u32 identity)
{
	return ((identity & IDENTITY_MAX) << MARK_IDENTITY_SHIFT) | MARK_MAGIC_IDENTITY;
}

#endif /* VEIL_MAPS_H */
