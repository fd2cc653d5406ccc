/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Shared constants of the Veil datapath. Every value here that user space
 * also sees has a mirror in src/datapath/maps.rs; change both together. */
#ifndef VEIL_COMMON_H
#define VEIL_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* skb->mark layout: low byte is a magic tag so that other users of the mark
 * (iptables, other CNIs) can tell a Veil identity mark from theirs; the
 * identity lives in bits 8..31 (24 bits, as in Cilium's MARK_MAGIC_IDENTITY). */
#define MARK_MAGIC_IDENTITY 0x5e
#define MARK_IDENTITY_SHIFT 8
#define IDENTITY_MAX 0x00ffffffU

/* Reserved security identities; allocated ones start above these. */
#define ID_HOST 1
#define ID_WORLD 2
#define ID_UNMANAGED 3
#define ID_REMOTE_NODE 4

/* veil_config.flags */
#define CFG_ENABLED (1U << 0)
#define CFG_STRICT (1U << 1)
/* Strict mode converged (the node reports acceptsPlaintext: false): into_pod
 * drops plaintext arriving from remote pods and nodes. */
#define CFG_REFUSE_PLAINTEXT (1U << 2)

/* veil_remote value flags */
#define REMOTE_HAS_PEER (1U << 0)
/* This node's own pod CIDR: carved out of a covering cluster-wide entry, so
 * the longest match for a local pod address is never a strict-mode drop. */
#define REMOTE_LOCAL (1U << 1)

/* veil_endpoints value flags (none defined yet; reserved for policy). */

/* Outcome codes. Non-negative: the packet went on; negative: DROP_*, the
 * packet was dropped. The metrics slot of a code is its absolute value. */
#define FWD_TO_TUN 0   /* from_pod: redirected into the WireGuard TUN */
#define FWD_TO_POD 1   /* to_pod: delivered into a local pod via redirect_peer */
#define PASS_NO_PEER 2 /* from_pod, non-strict: remote pod without a peer, sent in plaintext */
#define DROP_NO_PEER (-3)  /* strict: remote pod CIDR without a ready peer */
#define DROP_INVALID (-4)  /* truncated or malformed L2/L3/L4 header */
#define DROP_NO_TUN (-5)   /* encryption on but no TUN ifindex configured */
#define DROP_WRITE (-6)    /* a packet rewrite helper failed */
#define DROP_POLICY (-7)   /* denied by policy (a deny rule, or isolated and not allowed) */
#define DROP_POLICY_UNENCRYPTED (-8) /* allowed only over the tunnel, and it was not */
#define DROP_PLAINTEXT_REFUSED (-9) /* into_pod: plaintext from a remote source, strict converged */
#define METRICS_MAX 10

/* Locally administered source MAC written on frames delivered into pods:
 * 02 (local, unicast) + "veil" + 00. The pod does not answer to it (it
 * replies through its own default route), so any sane unicast MAC works. */
static __always_inline void set_veil_src_mac(__u8 *mac)
{
	/* Byte stores rather than an initializer, so clang keeps the constant
	 * in instructions instead of emitting a .rodata map. */
	mac[0] = 0x02;
	mac[1] = 0x76;
	mac[2] = 0x65;
	mac[3] = 0x69;
	mac[4] = 0x6c;
	mac[5] = 0x00;
}

/* IPv4 fragment offset mask of iphdr.frag_off (RFC 791). */
#define IP_OFFSET_MASK 0x1fff

#endif /* VEIL_COMMON_H */
