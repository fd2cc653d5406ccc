/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* IPv4/IPv6 header parsing into family-neutral 16-byte addresses.
 *
 * All reads go through bpf_skb_load_bytes into stack copies: the helper
 * checks the bounds against skb->len (and handles non-linear skbs), so a
 * truncated packet yields an error instead of an out-of-bounds read, and the
 * verifier has no packet pointers to track. */
#ifndef VEIL_L3_H
#define VEIL_L3_H

#include "maps.h"

struct l3_info {
	struct addr16 saddr;
	struct addr16 daddr;
	__u32 l4_off;   /* absolute offset of the L4 header */
	__u8 nexthdr;   /* IPPROTO_* of the L4 header */
	__u8 has_l4;    /* 0 for non-first fragments and unparsed IPv6 extension chains */
	__u8 is_v6;
};

static __always_inline void addr16_from_v4(struct addr16 *a, __be32 v4)
{
	__builtin_memset(a, 0, sizeof(*a));
	a->b[10] = 0xff;
	a->b[11] = 0xff;
	__builtin_memcpy(&a->b[12], &v4, 4);
}

/* Parses the IPv4 header at `off`. Returns 0 or DROP_INVALID. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct l3_info *l3)
{
	struct iphdr ip;
	__u32 hlen;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return DROP_INVALID;
	if (ip.version != 4 || ip.ihl < 5)
		return DROP_INVALID;
	hlen = (__u32)ip.ihl * 4;
	/* RFC 791: total length covers header + data; the skb may carry
	 * trailing L2 padding, never less than the header says. A GSO
	 * super-packet above 64 KiB (BIG TCP, net/ipv4/ip_output.c) carries
	 * tot_len 0; its real length is skb->len. */
	if (ip.tot_len == 0 && skb->gso_size != 0) {
		if (skb->len < off + hlen)
			return DROP_INVALID;
	} else if (bpf_ntohs(ip.tot_len) < hlen || skb->len < off + bpf_ntohs(ip.tot_len)) {
		return DROP_INVALID;
	}

	addr16_from_v4(&l3->saddr, ip.saddr);
	addr16_from_v4(&l3->daddr, ip.daddr);
	l3->l4_off = off + hlen;
	l3->nexthdr = ip.protocol;
	/* Only the first fragment carries the L4 header. */
	l3->has_l4 = (bpf_ntohs(ip.frag_off) & IP_OFFSET_MASK) == 0;
	l3->is_v6 = 0;
	return 0;
}

/* Parses the fixed IPv6 header at `off` (RFC 8200 section 3). Extension
 * headers are not walked: a packet whose first next-header is not TCP is
 * steered by its addresses like any other, only the MSS clamp is skipped. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct l3_info *l3)
{
	struct ipv6hdr ip6;

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
		return DROP_INVALID;
	if (ip6.version != 6)
		return DROP_INVALID;
	/* payload_len 0 is a jumbogram (RFC 2675) or an IPv6 BIG TCP GSO
	 * packet; only the fixed header must then be present (checked above). */
	if (ip6.payload_len != 0 && skb->len < off + sizeof(ip6) + bpf_ntohs(ip6.payload_len))
		return DROP_INVALID;

	__builtin_memcpy(l3->saddr.b, &ip6.saddr, 16);
	__builtin_memcpy(l3->daddr.b, &ip6.daddr, 16);
	l3->l4_off = off + sizeof(ip6);
	l3->nexthdr = ip6.nexthdr;
	l3->has_l4 = ip6.nexthdr == IPPROTO_TCP || ip6.nexthdr == IPPROTO_UDP;
	l3->is_v6 = 1;
	return 0;
}

/* Parses the L3 header at `off` according to the ethertype `proto` (network
 * order). Returns 1 if parsed, 0 if not IP (leave alone), DROP_INVALID. */
static __always_inline int parse_l3(struct __sk_buff *skb, __be16 proto, __u32 off,
				    struct l3_info *l3)
{
	int ret;

	if (proto == bpf_htons(ETH_P_IP))
		ret = parse_ipv4(skb, off, l3);
	else if (proto == bpf_htons(ETH_P_IPV6))
		ret = parse_ipv6(skb, off, l3);
	else
		return 0;
	return ret < 0 ? ret : 1;
}

#endif /* VEIL_L3_H */
