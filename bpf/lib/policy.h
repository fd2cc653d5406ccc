/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/* Identity policy and connection tracking.
 *
 * The policy map is compiled in user space (src/policy/compile.rs, whose
 * module docs describe the key): deny precedence, port ranges and default
 * deny are all resolved there, so a verdict here is at most two LPM lookups
 * (the peer's table, then the "any peer" table). No hit means the subject
 * is not isolated in that direction and the packet passes.
 *
 * Connection tracking makes the policy stateful: the first packet of a flow
 * is judged, and if it passes its tuple is recorded; later packets of that
 * flow and packets of the reverse tuple (replies) pass without a policy
 * lookup until the entry has been idle for its timeout. A new connection in
 * the other direction has a different tuple (the initiator's ephemeral port)
 * and is judged on its own. Entries live in an LRU hash, so a full table
 * evicts the oldest flows instead of failing.
 *
 * ICMP echo is tracked by its identifier, as Cilium's conntrack does: an
 * echo request is judged and recorded under (requester, responder, id); an
 * echo reply passes only if it answers such a record (reverse tuple, same
 * id), and is otherwise judged as a new packet and never recorded, so an
 * unsolicited reply, or a reply to somebody else's ping, is not let in by an
 * unrelated allowed ping. Echo keys carry CT_KIND_ECHO so they never meet the
 * port-less keys of other ICMP messages.
 *
 * TCP FIN or RST seen on a tracked flow (either way) marks it closing: its
 * idle timeout drops from one hour to CT_TIMEOUT_CLOSE_NS (Cilium's
 * close timeout), enough for the rest of the teardown, and a SYN without ACK
 * on a closing tuple is a new connection, judged again. */
#ifndef VEIL_POLICY_H
#define VEIL_POLICY_H

#include "l3.h"

#define DIR_INGRESS 0
#define DIR_EGRESS 1
#define PEER_ANY 0
/* subject (32) + peer (32) + direction (8): the fixed part of a key. */
#define POLICY_FIXED_BITS 72
#define POLICY_FULL_BITS (POLICY_FIXED_BITS + 24)

#define VERDICT_DENY 0
#define VERDICT_ALLOW 1
#define VERDICT_ALLOW_ENCRYPTED 2

/* Idle timeouts, as Cilium's defaults for established TCP are far longer
 * than needed here: open TCP gets one hour, everything else one minute (a
 * UDP "connection" is its request/response exchange). */
#define CT_TIMEOUT_TCP_NS (3600ULL * 1000000000ULL)
#define CT_TIMEOUT_OTHER_NS (60ULL * 1000000000ULL)
/* After FIN or RST: the rest of the teardown (FIN-ACK, last ACK) still
 * passes; Cilium uses the same 10 s (CT_CLOSE_TIMEOUT). */
#define CT_TIMEOUT_CLOSE_NS (10ULL * 1000000000ULL)

/* ct_key.kind */
#define CT_KIND_PORTS 0
#define CT_KIND_ECHO 1
/* ct_value.flags */
#define CT_F_CLOSING 1

/* TCP header byte 13 (RFC 9293 section 3.1). */
#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

/* ICMP (RFC 792) and ICMPv6 (RFC 4443) echo types. */
#define ICMP_ECHO_REPLY_V4 0
#define ICMP_ECHO_REQUEST_V4 8
#define ICMP_ECHO_REQUEST_V6 128
#define ICMP_ECHO_REPLY_V6 129

#define ECHO_NONE 0
#define ECHO_REQUEST 1
#define ECHO_REPLY 2

/* Big-endian fields: the LPM trie matches key bytes in order, so the
 * (protocol, port) point must be stored most significant byte first. */
struct policy_key {
	__u32 prefixlen;
	__be32 subject;
	__be32 peer;
	__u8 dir;
	__u8 proto;
	__be16 port;
};

struct policy_value {
	__u8 verdict;
	__u8 pad[3];
	__u32 rule;
};

struct ct_key {
	struct addr16 saddr;
	struct addr16 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 kind; /* CT_KIND_* */
	__u8 pad[2];
};

struct ct_value {
	__u64 last_seen_ns;
	__u32 flags; /* CT_F_* */
	__u32 pad;
};

/* What conntrack needs from the L4 header. For an echo request ports[0] is
 * the identifier; for an echo reply ports[1] is, so that the reverse tuple
 * of a reply is the key of the request it answers. */
struct l4_info {
	__be16 ports[2];
	__u8 echo;      /* ECHO_* */
	__u8 tcp_flags; /* 0 unless TCP */
};

/* Drops by identity pair and reason (the subject of the failed check is
 * `src` for egress, `dst` for ingress: the reason's direction says which). */
struct policy_drop_key {
	__u32 src;
	__u32 dst;
	__u32 reason; /* |DROP_*| */
	__u32 dir;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
} veil_policy SEC(".maps") __weak;

/* ipBlock prefixes -> node-local CIDR identity, for addresses the IP cache
 * does not know. Key as veil_remote. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct remote_key);
	__type(value, __u32);
} veil_cidr SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} veil_ct SEC(".maps") __weak;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct policy_drop_key);
	__type(value, __u64);
} veil_policy_drops SEC(".maps") __weak;

/* Packets that passed policy, per direction enforced (DIR_*): a per-CPU
 * array, so counting every allowed packet costs one lookup and an add. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} veil_policy_allowed SEC(".maps") __weak;

/* The identity of a peer address: a pod's (IP cache, authenticated for
 * remote pods by cryptokey routing), else an ipBlock's, else world. */
static __always_inline __u32 addr_identity(const struct addr16 *a)
{
	struct remote_key k;
	__u32 *id;

	id = bpf_map_lookup_elem(&veil_ipcache, a);
	if (id)
		return *id;
	k.prefixlen = 128;
	__builtin_memcpy(k.addr, a->b, 16);
	id = bpf_map_lookup_elem(&veil_cidr, &k);
	return id ? *id : ID_WORLD;
}

/* Source and destination ports (network order) of TCP/UDP/SCTP, all of
 * which start with them (RFC 9293, RFC 768, RFC 9260), the TCP flags, and
 * the identifier of ICMP/ICMPv6 echo messages (type, code, checksum, then
 * identifier); zeros for other protocols and non-first fragments. Returns 0
 * or DROP_INVALID. */
static __always_inline int l4_parse(struct __sk_buff *skb, const struct l3_info *l3,
				    struct l4_info *l4)
{
	__u8 icmp[6];

	l4->ports[0] = 0;
	l4->ports[1] = 0;
	l4->echo = ECHO_NONE;
	l4->tcp_flags = 0;
	if (!l3->has_l4)
		return 0;
	if ((!l3->is_v6 && l3->nexthdr == IPPROTO_ICMP) ||
	    (l3->is_v6 && l3->nexthdr == IPPROTO_ICMPV6)) {
		if (bpf_skb_load_bytes(skb, l3->l4_off, icmp, sizeof(icmp)) < 0)
			return DROP_INVALID;
		if (icmp[0] == (l3->is_v6 ? ICMP_ECHO_REQUEST_V6 : ICMP_ECHO_REQUEST_V4)) {
			l4->echo = ECHO_REQUEST;
			__builtin_memcpy(&l4->ports[0], &icmp[4], 2);
		} else if (icmp[0] == (l3->is_v6 ? ICMP_ECHO_REPLY_V6 : ICMP_ECHO_REPLY_V4)) {
			l4->echo = ECHO_REPLY;
			__builtin_memcpy(&l4->ports[1], &icmp[4], 2);
		}
		return 0;
	}
	if (l3->nexthdr != IPPROTO_TCP && l3->nexthdr != IPPROTO_UDP &&
	    l3->nexthdr != IPPROTO_SCTP)
		return 0;
	if (bpf_skb_load_bytes(skb, l3->l4_off, l4->ports, 4) < 0)
		return DROP_INVALID;
	if (l3->nexthdr == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, l3->l4_off + 13, &l4->tcp_flags, 1) < 0)
		return DROP_INVALID;
	return 0;
}

/* One direction's verdict: 0 to pass, or DROP_POLICY(_UNENCRYPTED). */
static __always_inline int policy_check(__u32 subject, __u32 peer, __u8 dir, __u8 proto,
					__be16 port, int encrypted)
{
	struct policy_value *v;
	struct policy_key k = {
		.prefixlen = POLICY_FULL_BITS,
		.subject = bpf_htonl(subject),
		.peer = bpf_htonl(peer),
		.dir = dir,
		.proto = proto,
		.port = port,
	};

	v = bpf_map_lookup_elem(&veil_policy, &k);
	if (!v) {
		k.peer = bpf_htonl(PEER_ANY);
		v = bpf_map_lookup_elem(&veil_policy, &k);
	}
	if (!v)
		return 0;
	if (v->verdict == VERDICT_ALLOW)
		return 0;
	if (v->verdict == VERDICT_ALLOW_ENCRYPTED)
		return encrypted ? 0 : DROP_POLICY_UNENCRYPTED;
	return DROP_POLICY;
}

static __always_inline void policy_count_drop(__u32 src, __u32 dst, __u32 dir, int code)
{
	struct policy_drop_key k = {
		.src = src,
		.dst = dst,
		.reason = (__u32)(-code),
		.dir = dir,
	};
	__u64 one = 1, *n;

	n = bpf_map_lookup_elem(&veil_policy_drops, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&veil_policy_drops, &k, &one, BPF_NOEXIST);
}

/* Whether a tracked entry still admits this packet; refreshes it if so.
 * Racing CPUs write similar times and only ever set the closing flag, so
 * the plain read-modify-writes are harmless. */
static __always_inline int ct_use(struct ct_value *v, __u8 proto, __u8 tcp_flags, __u64 now)
{
	__u64 timeout = proto == IPPROTO_TCP ? CT_TIMEOUT_TCP_NS : CT_TIMEOUT_OTHER_NS;

	if (v->flags & CT_F_CLOSING) {
		timeout = CT_TIMEOUT_CLOSE_NS;
		/* The tuple is being reused by a new connection: judge it. */
		if ((tcp_flags & (TCPF_SYN | TCPF_ACK)) == TCPF_SYN)
			return 0;
	}
	if (now - v->last_seen_ns > timeout)
		return 0;
	if (tcp_flags & (TCPF_FIN | TCPF_RST))
		v->flags |= CT_F_CLOSING;
	v->last_seen_ns = now;
	return 1;
}

/* Enforces policy on one packet from `src` to `dst`: the egress of `src`
 * when `egress`, the ingress of `dst` when `ingress`. `encrypted`: the
 * packet crosses (or crossed) the tunnel. Returns 0 to pass or a DROP_*
 * code, already counted by identity pair. */
static __always_inline int policy_judge(struct __sk_buff *skb, const struct l3_info *l3,
					__u32 src, __u32 dst, int egress, int ingress,
					int encrypted)
{
	struct ct_value *ct, fresh = {};
	struct ct_key key = {};
	struct l4_info l4;
	__be16 port;
	__u64 now;
	int ret;

	ret = l4_parse(skb, l3, &l4);
	if (ret < 0)
		return ret;
	now = bpf_ktime_get_ns();
	key.proto = l3->nexthdr;
	key.kind = l4.echo != ECHO_NONE ? CT_KIND_ECHO : CT_KIND_PORTS;

	/* Reply of a tracked flow? An echo request never is one. */
	if (l4.echo != ECHO_REQUEST) {
		key.saddr = l3->daddr;
		key.daddr = l3->saddr;
		key.sport = l4.ports[1];
		key.dport = l4.ports[0];
		ct = bpf_map_lookup_elem(&veil_ct, &key);
		if (ct && ct_use(ct, key.proto, l4.tcp_flags, now))
			return 0;
	}
	/* A later packet of a flow already admitted? Echo replies are only
	 * ever answers, never recorded flows of their own. */
	key.saddr = l3->saddr;
	key.daddr = l3->daddr;
	key.sport = l4.ports[0];
	key.dport = l4.ports[1];
	if (l4.echo != ECHO_REPLY) {
		ct = bpf_map_lookup_elem(&veil_ct, &key);
		if (ct && ct_use(ct, key.proto, l4.tcp_flags, now))
			return 0;
	}

	/* Policy has no ICMP ports: the echo identifier is not one. */
	port = l4.echo != ECHO_NONE ? 0 : l4.ports[1];
	if (egress) {
		ret = policy_check(src, dst, DIR_EGRESS, l3->nexthdr, port, encrypted);
		if (ret < 0) {
			policy_count_drop(src, dst, DIR_EGRESS, ret);
			return ret;
		}
	}
	if (ingress) {
		ret = policy_check(dst, src, DIR_INGRESS, l3->nexthdr, port, encrypted);
		if (ret < 0) {
			policy_count_drop(src, dst, DIR_INGRESS, ret);
			return ret;
		}
	}
	if (l4.echo == ECHO_REPLY)
		return 0;
	fresh.last_seen_ns = now;
	if (l4.tcp_flags & (TCPF_FIN | TCPF_RST))
		fresh.flags = CT_F_CLOSING;
	/* Best effort: if the insert fails the next packet is judged again. */
	bpf_map_update_elem(&veil_ct, &key, &fresh, BPF_ANY);
	return 0;
}

static __always_inline void policy_count_allow(__u32 dir)
{
	__u64 *n = bpf_map_lookup_elem(&veil_policy_allowed, &dir);

	/* Per-CPU slot: no other writer. */
	if (n)
		*n += 1;
}

/* policy_judge, counting a passed packet once per direction enforced
 * (denials are counted by identity pair in policy_judge). */
static __always_inline int policy_enforce(struct __sk_buff *skb, const struct l3_info *l3,
					  __u32 src, __u32 dst, int egress, int ingress,
					  int encrypted)
{
	int ret = policy_judge(skb, l3, src, dst, egress, ingress, encrypted);

	if (ret == 0) {
		if (egress)
			policy_count_allow(DIR_EGRESS);
		if (ingress)
			policy_count_allow(DIR_INGRESS);
	}
	return ret;
}

#endif /* VEIL_POLICY_H */
