/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* TCP MSS clamping on SYN and SYN-ACK.
 *
 * bpf_redirect into the TUN skips the route MTU check, so the WireGuard
 * overhead must be taken out of the MSS each end announces: otherwise full
 * sized segments would exceed the TUN MTU after encapsulation. */
#ifndef VEIL_MSS_H
#define VEIL_MSS_H

#include "l3.h"

#define TCP_OPT_EOL 0
#define TCP_OPT_NOP 1
#define TCP_OPT_MSS 2
#define TCP_OPT_MSS_LEN 4
#define TCP_OPTS_MAX 40 /* RFC 9293: data offset <= 15 words */

/* Lowers the MSS option of a TCP SYN at l3->l4_off to at most `mss_max`.
 * Returns 0 (clamped or nothing to do) or DROP_INVALID / DROP_WRITE. */
static __always_inline int mss_clamp(struct __sk_buff *skb, const struct l3_info *l3,
				     __u16 mss_max)
{
	__u8 opts[TCP_OPTS_MAX];
	struct tcphdr th;
	__u32 optlen, i, n;

	if (!l3->has_l4 || l3->nexthdr != IPPROTO_TCP || mss_max == 0)
		return 0;
	if (bpf_skb_load_bytes(skb, l3->l4_off, &th, sizeof(th)) < 0)
		return DROP_INVALID;
	if (!th.syn)
		return 0;
	if (th.doff < 5)
		return DROP_INVALID;
	optlen = ((__u32)th.doff - 5) * 4;
	if (optlen == 0)
		return 0;
	/* doff is 4 bits, so optlen <= 40; the mask keeps the verifier's
	 * bounds for the helper's size argument explicit. */
	optlen &= 0x3f;
	if (optlen > TCP_OPTS_MAX || optlen == 0)
		return DROP_INVALID;
	if (bpf_skb_load_bytes(skb, l3->l4_off + sizeof(th), opts, optlen) < 0)
		return DROP_INVALID;

	i = 0;
	/* Every step advances i by at least 1, so TCP_OPTS_MAX iterations
	 * cover the whole option space; the bound is for the verifier. */
	for (n = 0; n < TCP_OPTS_MAX; n++) {
		__u8 kind, len;

		if (i >= optlen || i >= TCP_OPTS_MAX - 1)
			break;
		kind = opts[i];
		if (kind == TCP_OPT_EOL)
			break;
		if (kind == TCP_OPT_NOP) {
			i++;
			continue;
		}
		len = opts[i + 1];
		/* A length below 2 or past the end is malformed; the receiver
		 * will reject the segment, so stop looking (RFC 9293 3.1). */
		if (len < 2 || i + len > optlen)
			break;
		if (kind == TCP_OPT_MSS && len == TCP_OPT_MSS_LEN) {
			__u32 voff = i + 2;
			__u16 old_raw, new_raw, old_mss;
			__u32 abs_off;

			if (voff + 1 >= TCP_OPTS_MAX)
				break;
			old_mss = ((__u16)opts[voff] << 8) | opts[voff + 1];
			if (old_mss <= mss_max)
				return 0;
			__builtin_memcpy(&old_raw, &opts[voff], 2);
			new_raw = bpf_htons(mss_max);
			abs_off = l3->l4_off + sizeof(th) + voff;
			if (bpf_skb_store_bytes(skb, abs_off, &new_raw, 2, 0) < 0)
				return DROP_WRITE;
			/* The Internet checksum sums 16-bit words at even
			 * offsets of the TCP header (RFC 1071). A field at an
			 * odd offset straddles two words with its bytes in
			 * the opposite halves, which in one's complement
			 * arithmetic is the byte-swapped value (RFC 1071
			 * 2(B), byte order independence). */
			if ((sizeof(th) + voff) & 1) {
				old_raw = __builtin_bswap16(old_raw);
				new_raw = __builtin_bswap16(new_raw);
			}
			if (bpf_l4_csum_replace(skb, l3->l4_off + __builtin_offsetof(struct tcphdr, check),
						old_raw, new_raw, sizeof(__u16)) < 0)
				return DROP_WRITE;
			return 0;
		}
		i += len;
	}
	return 0;
}

#endif /* VEIL_MSS_H */
