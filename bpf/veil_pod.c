/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* from_pod: TC ingress of a local pod's host-side veth, i.e. every packet
 * the pod sends. Stamps the sender's identity into skb->mark, enforces the
 * sender's egress policy (and, for a destination on this node, whose
 * packets never reach to_pod, the receiver's ingress policy) and, while
 * encryption is enabled, steers packets for remote pod CIDRs into the
 * WireGuard TUN, or drops them (strict) when the peer is not ready. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/l3.h"
#include "lib/mss.h"
#include "lib/policy.h"

/* Learns the pod's eth0 MAC from the frame it sent, so that to_pod can
 * address frames to it. Best effort: racing writers store the same bytes. */
static __always_inline void learn_mac(struct endpoint_value *ep, const struct ethhdr *eth)
{
	if (__builtin_memcmp(ep->mac, eth->h_source, ETH_ALEN) != 0)
		__builtin_memcpy(ep->mac, eth->h_source, ETH_ALEN);
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	struct endpoint_value *ep, *dst_ep;
	struct remote_value *remote;
	struct config_value *cfg;
	struct remote_key rkey;
	struct l3_info l3 = {};
	struct ethhdr eth;
	__u32 src_id;
	int tunnel = 0, no_peer = 0;
	__u16 mss;
	int ret;

	/* A veth frame always starts with an Ethernet header. */
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return drop(skb, DROP_INVALID);
	ret = parse_l3(skb, eth.h_proto, ETH_HLEN, &l3);
	if (ret < 0)
		return drop(skb, ret);
	if (ret == 0)
		return TC_ACT_OK; /* ARP and other non-IP: not ours to steer */

	ep = bpf_map_lookup_elem(&veil_endpoints, &l3.saddr);
	if (ep) {
		learn_mac(ep, &eth);
		src_id = ep->identity;
	} else {
		src_id = ID_UNMANAGED;
	}
	skb->mark = identity_mark(src_id);

	/* Same-node traffic stays in plaintext on the host, even if a remote
	 * CIDR were to overlap a local pod (it must not; be safe anyway). It
	 * never passes to_pod, so both ends' policies are enforced here. */
	dst_ep = bpf_map_lookup_elem(&veil_endpoints, &l3.daddr);
	if (dst_ep) {
		ret = policy_enforce(skb, &l3, src_id, dst_ep->identity, 1, 1, 0);
		if (ret < 0)
			return drop(skb, ret);
		return TC_ACT_OK;
	}

	cfg = config_get();
	if (cfg && (cfg->flags & CFG_ENABLED)) {
		rkey.prefixlen = 128;
		__builtin_memcpy(rkey.addr, l3.daddr.b, 16);
		remote = bpf_map_lookup_elem(&veil_remote, &rkey);
		if (remote && !(remote->flags & REMOTE_LOCAL)) {
			if (!(remote->flags & REMOTE_HAS_PEER)) {
				if (cfg->flags & CFG_STRICT)
					return drop(skb, DROP_NO_PEER);
				no_peer = 1;
			} else if (cfg->tun_ifindex == 0) {
				/* Fail closed: encryption on and a peer known, but nowhere to send. */
				return drop(skb, DROP_NO_TUN);
			} else {
				tunnel = 1;
			}
		}
	}

	/* The receiver's ingress is its node's business (to_pod there). */
	ret = policy_enforce(skb, &l3, src_id, addr_identity(&l3.daddr), 1, 0, tunnel);
	if (ret < 0)
		return drop(skb, ret);
	if (!tunnel) {
		if (no_peer)
			metrics_count(skb, PASS_NO_PEER);
		return TC_ACT_OK;
	}

	mss = l3.is_v6 ? cfg->mss_v6 : cfg->mss_v4;
	ret = mss_clamp(skb, &l3, mss);
	if (ret < 0)
		return drop(skb, ret);

	metrics_count(skb, FWD_TO_TUN);
	/* Redirecting to the TUN's egress: the TUN is an L3 device
	 * (header_ops == NULL), so __bpf_redirect_no_mac strips the Ethernet
	 * header on the way (net/core/filter.c). */
	return bpf_redirect(cfg->tun_ifindex, 0);
}

/* into_pod: TC egress of a local pod's host-side veth, i.e. every packet
 * the kernel routes or bridges into the pod. Decrypted tunnel traffic never
 * passes here: to_pod hands it over with bpf_redirect_peer, which enters the
 * pod's eth0 ingress directly (skb_do_redirect, net/core/filter.c) and
 * skips this device's egress. So once strict mode has converged (the node
 * reports acceptsPlaintext: false), a packet here whose source is a remote
 * pod or node arrived in plaintext over the underlay: it is dropped. Local
 * pods, the host and the world pass untouched. */
SEC("classifier")
int into_pod(struct __sk_buff *skb)
{
	struct remote_value *remote;
	struct config_value *cfg;
	struct remote_key rkey;
	struct l3_info l3 = {};
	struct ethhdr eth;
	int ret;

	cfg = config_get();
	if (!cfg || !(cfg->flags & CFG_REFUSE_PLAINTEXT))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return drop(skb, DROP_INVALID);
	ret = parse_l3(skb, eth.h_proto, ETH_HLEN, &l3);
	if (ret < 0)
		return drop(skb, ret); /* unparsable: cannot tell it is not remote */
	if (ret == 0)
		return TC_ACT_OK; /* ARP and other non-IP */

	/* The IP cache holds remote pods and remote nodes' addresses only. */
	if (bpf_map_lookup_elem(&veil_ipcache, &l3.saddr))
		return drop(skb, DROP_PLAINTEXT_REFUSED);
	/* A remote pod CIDR (or the cluster-wide range minus this node's own
	 * CIDR) covers remote pods the IP cache does not list yet. */
	rkey.prefixlen = 128;
	__builtin_memcpy(rkey.addr, l3.saddr.b, 16);
	remote = bpf_map_lookup_elem(&veil_remote, &rkey);
	if (remote && !(remote->flags & REMOTE_LOCAL))
		return drop(skb, DROP_PLAINTEXT_REFUSED);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
