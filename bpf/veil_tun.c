/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* to_pod: TC ingress of the WireGuard TUN (veil0), i.e. every decrypted
 * packet. The source was authenticated by cryptokey routing in the engine,
 * so its identity comes from the IP cache; packets for local pods are given
 * an Ethernet header and handed straight to the pod's eth0 with
 * bpf_redirect_peer, after the receiver's ingress policy. Anything else
 * goes up the stack and is routed. */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/l3.h"
#include "lib/mss.h"
#include "lib/policy.h"

static __always_inline int mac_is_zero(const __u8 *mac)
{
	return (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) == 0;
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	struct endpoint_value *ep;
	struct config_value *cfg;
	struct l3_info l3 = {};
	struct ethhdr eth;
	__u32 src_id;
	__u32 l3_off;
	__u16 mss = 0;
	int ret;

	cfg = config_get();
	/* On the TUN (an L3 device, no header_ops) the packet starts with the
	 * IP header and skb->protocol comes from the TUN packet information.
	 * Anywhere else, BPF_PROG_TEST_RUN included (net/bpf/test_run.c always
	 * frames the data with Ethernet), an Ethernet header comes first. */
	l3_off = (cfg && cfg->tun_ifindex != 0 && skb->ifindex == cfg->tun_ifindex) ? 0 : ETH_HLEN;

	ret = parse_l3(skb, (__be16)skb->protocol, l3_off, &l3);
	if (ret < 0)
		return drop(skb, ret);
	if (ret == 0)
		return TC_ACT_OK;

	src_id = addr_identity(&l3.saddr);
	skb->mark = identity_mark(src_id);

	ep = bpf_map_lookup_elem(&veil_endpoints, &l3.daddr);
	if (!ep)
		return TC_ACT_OK; /* not a local pod: the kernel routes it */

	/* Everything on this hook came out of the tunnel: encrypted. */
	ret = policy_enforce(skb, &l3, src_id, ep->identity, 0, 1, 1);
	if (ret < 0)
		return drop(skb, ret);

	if (cfg)
		mss = l3.is_v6 ? cfg->mss_v6 : cfg->mss_v4;
	ret = mss_clamp(skb, &l3, mss);
	if (ret < 0)
		return drop(skb, ret);

	if (l3_off == 0 && bpf_skb_change_head(skb, ETH_HLEN, 0) < 0)
		return drop(skb, DROP_WRITE);

	/* Unknown MAC (the pod has not sent anything yet): broadcast, which
	 * the pod's IP layer accepts for a unicast IP destination unless
	 * drop_unicast_in_l2_multicast is set. */
	if (mac_is_zero(ep->mac))
		__builtin_memset(eth.h_dest, 0xff, ETH_ALEN);
	else
		__builtin_memcpy(eth.h_dest, ep->mac, ETH_ALEN);
	set_veil_src_mac(eth.h_source);
	eth.h_proto = (__be16)skb->protocol;
	if (bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0) < 0)
		return drop(skb, DROP_WRITE);

	metrics_count(skb, FWD_TO_POD);
	/* redirect_peer switches the skb to the veth peer's ingress inside the
	 * pod's namespace without a backlog round trip; plain bpf_redirect of
	 * a TUN packet into a veth is dropped on this kernel. */
	return bpf_redirect_peer(ep->ifindex, 0);
}
