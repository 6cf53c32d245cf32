// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/*
 * The in-kernel fast path for spliced flows: a tc clsact ingress program on
 * the proxy namespace's external links.
 *
 * Read first: thesis 5.2-5.4 (what a relayed segment's rewrite is),
 * daemon/splice/translator.py (the reference semantics: this program is its
 * plain-mode translate() for the segments it accepts), DESIGN.md "The kernel
 * fast path for spliced flows" (checksum states on veth, verifier limits).
 *
 * Theory of operation
 * -------------------
 * The daemon installs one struct splice_xlate per direction of a splice,
 * keyed by the 4-tuple of the packets that direction receives.  For such a
 * packet the program rewrites the headers exactly as translate() would and
 * redirects it to the other link with bpf_redirect_neigh(), so the packet
 * never reaches the TUN.  Everything it does not fully understand it leaves
 * alone (TC_ACT_OK: "punt"): the kernel routes the packet into the TUN and
 * the Python daemon, which owns all policy, handles it.  Punting is always
 * correct; only the rate of punts is a performance question, so the program
 * accepts just the shapes Linux sends during a bulk transfer:
 *
 *   IPv4 with ihl 5 and not a fragment, or IPv6 with TCP as the next
 *   header (no extension headers), TCP with ACK and none of SYN FIN RST URG,
 *   options: none | NOP NOP TS | NOP NOP TS NOP NOP SACK(1-3)
 *            | NOP NOP SACK(1-4)                     (RFC 7323 appendix A),
 *   a single segment's payload <= out_mss (a GSO packet's gso_size is
 *   lowered to out_mss when it is larger: the kernel cuts it at that).
 *
 * With fixed layouts every field sits at a constant offset: no option loop
 * (a bounded loop over options hit the verifier's limit in the prototype).
 * The two families get a copy each of the same code (splice() is inlined
 * with the family as a constant), so every offset stays constant.
 *
 * Families.  An entry says which family its output connection is; a splice
 * may join an IPv4 connection to an IPv6 one.  Across families the program
 * rewrites TCP in place as always, then bpf_skb_change_proto() makes room
 * for the other header (20 bytes more or less in front of TCP, a GSO packet
 * retyped, its gso_size kept) and the new header is written whole: the
 * same header the Python relay writes (daemon/splice/family.py: the output
 * connection's flow label, hop limit or TTL 64, the traffic class as the
 * TOS, DF).  The TCP
 * checksum only needs the pseudo-header's addresses swapped: its length
 * and protocol words sum the same in both families (RFC 8200 8.1).
 *
 * Checksums.  On veth most skbs are CHECKSUM_PARTIAL: the TCP checksum field
 * holds only the pseudo-header sum, and the device (or the peer's stack)
 * finishes it.  So the TCP checksum is never computed here: the rewrite
 * collects two ones'-complement differences, one over TCP header words and
 * one over the addresses, and hands them to bpf_l4_csum_replace(), with
 * flags 0 for the first (a no-op on a partial skb, an RFC 1624 update on a
 * complete one) and BPF_F_PSEUDO_HDR for the second (the kernel knows which
 * of the two an skb needs).  The payload is never read.  The IPv4 header
 * checksum is always complete and is recomputed over the 20 bytes; IPv6
 * has none.
 *
 * Packet pointers die at any helper that may change the skb, so all direct
 * writes come first and the two checksum helpers last.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "splice_map.h"

#define IP_OFF ETH_HLEN		   /* 14: veth ingress, data at the MAC header */
#define IP4_HLEN 20		   /* only ihl 5 is handled */
#define IP6_HLEN 40		   /* no extension headers */
#define HDR_MAX (IP_OFF + IP6_HLEN + 60)
#define NEED_PULL (-2)		   /* internal: headers not in the linear area */

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10
#define TCPF_URG 0x20
#define KEEP_FLAGS 0x3f		   /* ECE and CWR cleared (RFC 3168 6.1) */
#define NOP4 0x01010101
#define NOP_NOP_TS 0x0101080a
#define NOP_NOP_SACK 0x01010500	   /* | the SACK option's length */
#define FRAG_BITS 0x3fff	   /* MF + fragment offset */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the flows in use */
	__uint(max_entries, SPLICE_MAX_FLOWS_DEFAULT);
	__type(key, struct splice_key);
	__type(value, struct splice_xlate);
} splice_flows SEC(".maps");

/* Per entry of splice_flows, same key: what the program redirected
 * (splice_map.h: why not in the entry itself). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, SPLICE_MAX_FLOWS_DEFAULT);
	__type(key, struct splice_key);
	__type(value, struct splice_count);
} splice_counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct splice_stats);
} splice_stats SEC(".maps");

static __always_inline struct splice_stats *stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&splice_stats, &zero);
}

#define PUNT(counter)                                                  \
	({                                                             \
		struct splice_stats *s_ = stats();                     \
		if (s_)                                                \
			s_->counter++;                                 \
		TC_ACT_OK;                                             \
	})

/* One 32-bit word of a ones'-complement difference (RFC 1624 eqn. 3). */
static __always_inline __u64 csum_step(__u64 acc, __u32 old, __u32 new)
{
	return acc + (__u32)~old + new;
}

static __always_inline __u32 csum_fold32(__u64 acc)
{
	acc = (acc & 0xffffffff) + (acc >> 32);
	acc = (acc & 0xffffffff) + (acc >> 32);
	return (__u32)acc;
}

/* A 32-bit sequence-space field plus a delta, in place; returns the new sum. */
static __always_inline __u64 add_be32(__u32 *p, __u32 delta, __u64 acc)
{
	__u32 old = *p;
	__u32 new = bpf_htonl(bpf_ntohl(old) + delta);

	*p = new;
	return csum_step(acc, old, new);
}

/*
 * The SACK option at `sack` (its NOP NOP 5 len word, then n blocks):
 * edges shifted into the output's acknowledgment space (5.4.3; a D-SACK
 * block below the ACK is a sequence range like any other, RFC 2883), or
 * the whole option turned into NOPs when SACK is not mapped.
 */
static __always_inline int rewrite_sack(__u32 *sack, void *data_end, __u32 n,
					const struct splice_xlate *v, __u64 *acc)
{
	int i;

	if ((void *)(sack + 1) > data_end)
		return -1;
	if (v->sack_map) {
#pragma unroll
		for (i = 1; i <= 8; i++) {
			if (i > 2 * n)
				break;
			if ((void *)(sack + i + 1) > data_end)
				return -1;
			*acc = add_be32(sack + i, v->ack_delta, *acc);
		}
		return 0;
	}
	*acc = csum_step(*acc, sack[0], bpf_htonl(NOP4));
	sack[0] = bpf_htonl(NOP4);
#pragma unroll
	for (i = 1; i <= 8; i++) {
		if (i > 2 * n)
			break;
		if ((void *)(sack + i + 1) > data_end)
			return -1;
		*acc = csum_step(*acc, sack[i], bpf_htonl(NOP4));
		sack[i] = bpf_htonl(NOP4);
	}
	return 0;
}

/* The IPv4 header checksum, over its 20 bytes (always complete). */
static __always_inline __u16 ip4_csum(const __u32 *ip)
{
	__u64 sum = 0;

#pragma unroll
	for (int i = 0; i < 5; i++)
		sum += ip[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* An IPv6 extension header that may stand between the header and TCP
 * (RFC 8200 4.1): such a packet is one the program does not handle. */
static __always_inline int ipv6_ext_header(__u8 nexthdr)
{
	return nexthdr == 0 || nexthdr == 43 || nexthdr == 44 || nexthdr == 60;
}

/*
 * Where a packet the program punts before its usual lookup (IPv4 options
 * or a fragment, IPv6 extension headers) goes: an entry with a punt
 * interface is a taken-over kernel connection's, on the host's own
 * addresses, and left to the kernel such a packet would find no socket
 * and be answered with a RST.  So the ports are read where the TCP header
 * really starts (`l4_off`) and the entry looked up for its punt_ifindex.
 * A fragment other than the first carries no ports: it stays the kernel's
 * (whose reassembly never completes without the first: dropped, as the
 * daemon drops every fragment).
 */
static __always_inline void punt_target(struct __sk_buff *skb, struct splice_key *key,
					__u32 l4_off, __u32 *punt_to)
{
	struct splice_xlate *v;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)) < 0)
		return;
	key->sport = ports[0];
	key->dport = ports[1];
	v = bpf_map_lookup_elem(&splice_flows, key);
	if (v)
		*punt_to = v->punt_ifindex;
}

/* The TCP header's offset behind an IPv6 packet's extension headers (RFC
 * 8200 4.1: hop-by-hop, routing, destination options, each (len + 1) * 8
 * bytes; a fragment header, 8), or 0 if it is not TCP, not the first
 * fragment, or behind more of them than this looks at. */
static __always_inline __u32 ipv6_tcp_offset(struct __sk_buff *skb, __u8 nexthdr)
{
	__u32 off = IP_OFF + IP6_HLEN;
	__u8 ext[2];
	__be16 frag;
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		if (nexthdr == IPPROTO_TCP)
			return off;
		if (!ipv6_ext_header(nexthdr))
			return 0;
		if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
			return 0;
		if (nexthdr == 44) {
			if (bpf_skb_load_bytes(skb, off + 2, &frag, sizeof(frag)) < 0 ||
			    (frag & bpf_htons(0xfff8)))
				return 0; /* a later fragment: no TCP header */
			off += 8;
		} else {
			off += ((__u32)ext[1] + 1) * 8;
		}
		nexthdr = ext[0];
	}
	return nexthdr == IPPROTO_TCP ? off : 0;
}

/*
 * One packet of family `fam` (4 or 6, a constant once inlined: each family
 * gets its own copy with every offset fixed, which is what the verifier
 * and the fixed-layout design want).
 */
static __always_inline int splice(struct __sk_buff *skb, int pulled, const int fam,
				  __u32 *punt_to)
{
	const __u32 ip_hlen = fam == 4 ? IP4_HLEN : IP6_HLEN;
	const __u32 tcp_off = IP_OFF + ip_hlen;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + IP_OFF;
	struct ipv6hdr *ip6 = data + IP_OFF;
	struct tcphdr *tcp = data + tcp_off;
	__u8 *tcpb = data + tcp_off;
	__u32 *tcpw = data + tcp_off;
	__u32 *opt = data + tcp_off + 20;
	struct splice_xlate *v;
	struct splice_count *cnt;
	struct splice_stats *st;
	struct splice_key key = {};
	__u32 ip_total, tcp_len, doff, optlen, payload, nsack = 0, w, old, new, seg, seg_len, mtu;
	__u64 acc = 0, acc_pseudo = 0;
	__u8 flags, tos, out_fam;
	int has_ts = 0, i;

	if (fam == 4) {
		if ((void *)(ip + 1) > data_end)
			goto not_linear;
		if (ip->protocol != IPPROTO_TCP)
			return TC_ACT_OK;
		key.saddr[0] = ip->saddr;
		key.daddr[0] = ip->daddr;
		key.family = SPLICE_AF_INET;
		if (*(__u8 *)ip != 0x45 || (ip->frag_off & bpf_htons(FRAG_BITS))) {
			__u32 ihl = (*(__u8 *)ip & 0x0f) * 4;

			/* Not a later fragment (offset 0): the ports are there. */
			if (ihl >= IP4_HLEN && !(ip->frag_off & bpf_htons(0x1fff)))
				punt_target(skb, &key, IP_OFF + ihl, punt_to);
			return PUNT(punt_ip_options_or_fragment);
		}
		ip_total = bpf_ntohs(ip->tot_len);
		tos = ip->tos;
	} else {
		if ((void *)(ip6 + 1) > data_end)
			goto not_linear;
#pragma unroll
		for (i = 0; i < 4; i++) {
			key.saddr[i] = ip6->saddr.in6_u.u6_addr32[i];
			key.daddr[i] = ip6->daddr.in6_u.u6_addr32[i];
		}
		key.family = SPLICE_AF_INET6;
		if (ip6->nexthdr != IPPROTO_TCP) {
			__u32 l4_off;

			if (!ipv6_ext_header(ip6->nexthdr))
				return TC_ACT_OK;
			l4_off = ipv6_tcp_offset(skb, ip6->nexthdr);
			if (l4_off)
				punt_target(skb, &key, l4_off, punt_to);
			return PUNT(punt_ip_options_or_fragment);
		}
		/* A jumbogram's payload length is 0 (RFC 2675): malformed below. */
		ip_total = IP6_HLEN + bpf_ntohs(ip6->payload_len);
		/* Traffic class: the low nibble of byte 0, the high one of byte 1. */
		tos = (((__u8 *)ip6)[0] << 4) | (((__u8 *)ip6)[1] >> 4);
	}
	if ((void *)(tcp + 1) > data_end)
		goto not_linear;

	key.sport = tcp->source;
	key.dport = tcp->dest;
	v = bpf_map_lookup_elem(&splice_flows, &key);
	if (!v)
		return PUNT(punt_no_flow);
	/* From here on, every punt of this entry goes where the entry says. */
	*punt_to = v->punt_ifindex;
	if (v->hold)
		return PUNT(held);
	out_fam = v->family;

	doff = (tcpb[12] >> 4) * 4;
	if (doff < 20 || ip_total < ip_hlen + doff || ip_total + ETH_HLEN > skb->len)
		return PUNT(punt_malformed);
	tcp_len = ip_total - ip_hlen;
	payload = tcp_len - doff;

	flags = tcpb[13];
	if ((flags & (TCPF_SYN | TCPF_FIN | TCPF_RST | TCPF_URG)) || !(flags & TCPF_ACK))
		return PUNT(punt_flags);

	/* Linux's layouts (RFC 7323 appendix A): TS first, SACK last. */
	optlen = doff - 20;
	if (optlen) {
		__u32 rest = optlen, sack_hdr;

		if ((void *)(opt + 1) > data_end)
			goto not_linear;
		if (opt[0] == bpf_htonl(NOP_NOP_TS)) {
			if (optlen < 12)
				return PUNT(punt_tcp_options_layout);
			has_ts = 1;
			rest -= 12;
		}
		if (rest) {
			if (rest < 12 || (rest & 7) != 4)
				return PUNT(punt_tcp_options_layout);
			nsack = (rest - 4) >> 3;
			if (has_ts) {
				if ((void *)(opt + 4) > data_end)
					goto not_linear;
				sack_hdr = opt[3];
			} else {
				sack_hdr = opt[0];
			}
			if (sack_hdr != bpf_htonl(NOP_NOP_SACK | (rest - 2)))
				return PUNT(punt_tcp_options_layout);
		}
	}

	/* 5.4.4: the kernel cuts a GSO packet at gso_size on the way out, so
	 * a GSO packet only needs its gso_size brought down to out_mss (below,
	 * once it is sure to be redirected); a single segment over out_mss
	 * is the daemon's to cut.  An IPv4 header can hold at most 65515
	 * bytes of TCP (never short of it in practice: GRO stops at 64 KB
	 * with the headers). */
	if (!skb->gso_size && payload > v->out_mss)
		return PUNT(punt_mss);
	if (out_fam == SPLICE_AF_INET && tcp_len > 0xffff - IP4_HLEN)
		return PUNT(punt_mss);
	seg = skb->gso_size;
	if (!seg)
		seg = payload;
	else if (seg > v->out_mss)
		seg = v->out_mss;

	/* RFC 1191 / 8201 for spliced flows: a packet the egress link cannot
	 * carry (a link's MTU shrank after the handshake) goes the daemon's
	 * way, where the kernel's forwarding answers it with "fragmentation
	 * needed" or "packet too big" and the daemon sends that on to this
	 * packet's sender.  Redirected, it would be dropped without a word.
	 * The length that must fit is one segment's with the output's IP
	 * header: what leaves after GSO and a change of family.  The helper
	 * only tells the link's MTU here (asked with an L3 length of 1, which
	 * always fits); its own verdict would pass any GSO packet unless
	 * asked per segment, and then in the input's family.  (No such
	 * device: a test run, never punted.) */
	seg_len = (out_fam == SPLICE_AF_INET6 ? IP6_HLEN : IP4_HLEN) + doff + seg;
	mtu = 1;
	if (bpf_check_mtu(skb, v->egress_ifindex, &mtu, 0, 0) == 0 && seg_len > mtu)
		return PUNT(punt_mtu);

	/* Only the daemon may decide what acknowledging its relayed FIN means
	 * (and, for a bounded splice, the last byte before its limit). */
	if (v->fin_watch && (__s32)(bpf_ntohl(tcp->ack_seq) - v->fin_ack) >= 0)
		return PUNT(punt_fin_watch);

	/* A bounded splice: bytes before the limit only.  The segment whose
	 * payload reaches it is the daemon's to cut (and its window and TSval
	 * are what the daemon's TCB resumes with); a pure ACK at the limit is
	 * the steady state of the direction that carries no data. */
	if (v->has_limit) {
		__s32 past = (__s32)(bpf_ntohl(tcp->seq) + payload - v->limit_seq);

		if (payload ? past >= 0 : past > 0)
			return PUNT(punt_limit);
	}

	/* A GSO packet whose segments the output connection cannot take
	 * (its peer offered a smaller MSS, or it is IPv6 and the input IPv4:
	 * 20 bytes of header more) gets a smaller gso_size.  No helper sets
	 * it; growing the room under the IP header by the difference lowers
	 * gso_size by as much, and taking the same bytes out again with
	 * FIXED_GSO leaves it there, the packet as it was.  First of all the
	 * rewrites, so that a refusal leaves the packet to the daemon as it
	 * came; the packet pointers are found again after it. */
	if (skb->gso_size > seg) {
		__u32 cut = skb->gso_size - seg;

		if (bpf_skb_adjust_room(skb, cut, BPF_ADJ_ROOM_NET, BPF_F_ADJ_ROOM_NO_CSUM_RESET))
			return PUNT(punt_mss);
		if (bpf_skb_adjust_room(skb, -(__s32)cut, BPF_ADJ_ROOM_NET,
					BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_NO_CSUM_RESET))
			goto rewrite_failed;
		st = stats();
		if (st)
			st->gso_recut++;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + IP_OFF;
		ip6 = data + IP_OFF;
		tcp = data + tcp_off;
		tcpb = data + tcp_off;
		tcpw = data + tcp_off;
		opt = data + tcp_off + 20;
		if ((void *)(tcp + 1) > data_end)
			goto rewrite_failed;
	}

	/* Options (5.4.1, 5.4.3), rewritten in place at their own length. */
	if (has_ts) {
		if ((void *)(opt + 3) > data_end)
			goto not_linear;
		if (v->ts_mode == SPLICE_TS_MAP) {
			__u32 tsecr;

			acc = add_be32(opt + 1, v->tsval_delta, acc);
			old = opt[2];
			tsecr = bpf_ntohl(old);
			/* An echo of a TSval the input TCB sent before the
			 * splice has no image in the output clock. */
			if (v->has_tsecr_floor && (__s32)(tsecr - v->tsecr_floor_in) < 0)
				tsecr = v->tsecr_floor_out;
			else
				tsecr += v->tsecr_delta;
			new = bpf_htonl(tsecr);
			opt[2] = new;
			acc = csum_step(acc, old, new);
		} else if (v->ts_mode == SPLICE_TS_STRIP) {
			acc = csum_step(acc, opt[0], bpf_htonl(NOP4));
			acc = csum_step(acc, opt[1], bpf_htonl(NOP4));
			acc = csum_step(acc, opt[2], bpf_htonl(NOP4));
			opt[0] = bpf_htonl(NOP4);
			opt[1] = bpf_htonl(NOP4);
			opt[2] = bpf_htonl(NOP4);
		}
		if (nsack && rewrite_sack(opt + 3, data_end, nsack, v, &acc))
			goto not_linear;
	} else if (nsack && rewrite_sack(opt, data_end, nsack, v, &acc)) {
		goto not_linear;
	}

	/* TCP fixed header (5.2.2, 5.3): ports, seq, ack, offset/flags/window. */
	old = tcpw[0];
	tcp->source = v->sport;
	tcp->dest = v->dport;
	acc = csum_step(acc, old, tcpw[0]);
	acc = add_be32(&tcpw[1], v->seq_delta, acc);
	acc = add_be32(&tcpw[2], v->ack_delta, acc);
	old = tcpw[3];
	w = bpf_ntohs(tcp->window);
	if (v->wnd_in_shift != v->wnd_out_shift) {
		/* 5.4.2: rounded down, never more than the peer allowed. */
		w = (w << (v->wnd_in_shift & 15)) >> (v->wnd_out_shift & 15);
		if (w > 0xffff)
			w = 0xffff;
	}
	tcpb[12] &= 0xf0; /* AE (AccECN) and reserved bits */
	tcpb[13] = v->ecn ? flags : flags & KEEP_FLAGS; /* ECE, CWR: RFC 3168 */
	tcp->window = bpf_htons(w);
	acc = csum_step(acc, old, tcpw[3]);

	/* The IP header (5.2.1): the output connection's addresses, TTL or hop
	 * limit 64 (an endpoint, not a router), Not-ECT unless both
	 * connections negotiated ECN.  The pseudo-header's length and protocol
	 * words sum the same in both families (RFC 8200 8.1), so across
	 * families too only the addresses change the TCP checksum. */
	if (!v->ecn)
		tos &= 0xfc;
	if (fam == 4) {
		acc_pseudo = csum_step(acc_pseudo, ip->saddr, 0);
		acc_pseudo = csum_step(acc_pseudo, ip->daddr, 0);
	} else {
#pragma unroll
		for (i = 0; i < 4; i++) {
			acc_pseudo = csum_step(acc_pseudo, ip6->saddr.in6_u.u6_addr32[i], 0);
			acc_pseudo = csum_step(acc_pseudo, ip6->daddr.in6_u.u6_addr32[i], 0);
		}
	}
	if (out_fam == SPLICE_AF_INET) {
		acc_pseudo = csum_step(acc_pseudo, 0, v->saddr[0]);
		acc_pseudo = csum_step(acc_pseudo, 0, v->daddr[0]);
	} else {
#pragma unroll
		for (i = 0; i < 4; i++) {
			acc_pseudo = csum_step(acc_pseudo, 0, v->saddr[i]);
			acc_pseudo = csum_step(acc_pseudo, 0, v->daddr[i]);
		}
	}
	if (fam == 4 && out_fam == SPLICE_AF_INET) {
		ip->saddr = v->saddr[0];
		ip->daddr = v->daddr[0];
		ip->tos = tos;
		ip->ttl = 64;
		ip->check = 0;
		ip->check = ip4_csum((__u32 *)ip);
	} else if (fam == 6 && out_fam == SPLICE_AF_INET6) {
		/* Version, traffic class, the output connection's flow label. */
		*(__be32 *)ip6 = bpf_htonl(6 << 28 | (__u32)tos << 20 | (v->flow_label & 0xfffff));
		ip6->hop_limit = 64;
#pragma unroll
		for (i = 0; i < 4; i++) {
			ip6->saddr.in6_u.u6_addr32[i] = v->saddr[i];
			ip6->daddr.in6_u.u6_addr32[i] = v->daddr[i];
		}
	}

	/* Helpers last: they invalidate every packet pointer above.  The
	 * checksum field is still where the input family put it. */
	if (bpf_l4_csum_replace(skb, tcp_off + 16, 0, csum_fold32(acc), 0) < 0 ||
	    bpf_l4_csum_replace(skb, tcp_off + 16, 0, csum_fold32(acc_pseudo),
				BPF_F_PSEUDO_HDR) < 0)
		goto rewrite_failed;

	if ((fam == 4) != (out_fam == SPLICE_AF_INET)) {
		/* Across families: the kernel makes room for the new header (or
		 * takes 20 bytes of the old one away) and retypes a GSO packet
		 * (TCPV4 <-> TCPV6; gso_size, the TCP segment size, stays);
		 * the header itself is written here, whole. */
		if (bpf_skb_change_proto(skb, bpf_htons(out_fam == SPLICE_AF_INET6 ? ETH_P_IPV6
										 : ETH_P_IP),
					 0) < 0)
			goto rewrite_failed;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		eth = data;
		if (out_fam == SPLICE_AF_INET6) {
			ip6 = data + IP_OFF;
			if ((void *)(ip6 + 1) > data_end)
				goto rewrite_failed;
			eth->h_proto = bpf_htons(ETH_P_IPV6);
			*(__be32 *)ip6 = bpf_htonl(6 << 28 | (__u32)tos << 20 |
						   (v->flow_label & 0xfffff));
			ip6->payload_len = bpf_htons(tcp_len);
			ip6->nexthdr = IPPROTO_TCP;
			ip6->hop_limit = 64;
#pragma unroll
			for (i = 0; i < 4; i++) {
				ip6->saddr.in6_u.u6_addr32[i] = v->saddr[i];
				ip6->daddr.in6_u.u6_addr32[i] = v->daddr[i];
			}
		} else {
			ip = data + IP_OFF;
			if ((void *)(ip + 1) > data_end)
				goto rewrite_failed;
			eth->h_proto = bpf_htons(ETH_P_IP);
			*(__u8 *)ip = 0x45;
			ip->tos = tos;
			ip->tot_len = bpf_htons(IP4_HLEN + tcp_len);
			ip->id = 0;
			ip->frag_off = bpf_htons(0x4000); /* DF, as we send everything */
			ip->ttl = 64;
			ip->protocol = IPPROTO_TCP;
			ip->saddr = v->saddr[0];
			ip->daddr = v->daddr[0];
			ip->check = 0;
			ip->check = ip4_csum((__u32 *)ip);
		}
		st = stats();
		if (st)
			st->redirected_family_changed++;
	}

	cnt = bpf_map_lookup_elem(&splice_counts, &key);
	if (cnt) {
		__sync_fetch_and_add(&cnt->packets, 1);
		__sync_fetch_and_add(&cnt->bytes, payload);
	}
	st = stats();
	if (st) {
		st->redirected_packets++;
		st->redirected_bytes += payload;
	}
	return bpf_redirect_neigh(v->egress_ifindex, NULL, 0, 0);

rewrite_failed:
	/* Half rewritten: neither path can use it; TCP retransmits. */
	st = stats();
	if (st)
		st->dropped_rewrite_failed++;
	return TC_ACT_SHOT;

not_linear:
	if (pulled)
		return PUNT(punt_malformed);
	return NEED_PULL;
}

static __always_inline int splice_frame(struct __sk_buff *skb, int pulled, __u32 *punt_to)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end || skb->vlan_present)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return splice(skb, pulled, 4, punt_to);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return splice(skb, pulled, 6, punt_to);
	return TC_ACT_OK;
}

/* A punt (TC_ACT_OK) of an entry with a punt_ifindex goes there instead. */
static __always_inline int punt_via(int verdict, __u32 punt_to)
{
	struct splice_stats *s;

	if (verdict != TC_ACT_OK || !punt_to)
		return verdict;
	s = stats();
	if (s)
		s->punt_redirected++;
	return bpf_redirect(punt_to, 0);
}

SEC("tc")
int splice_ingress(struct __sk_buff *skb)
{
	__u32 punt_to = 0;
	int verdict = splice_frame(skb, 0, &punt_to);
	__u32 len;

	if (verdict != NEED_PULL)
		return punt_via(verdict, punt_to);
	/* Headers outside the linear area: rare on veth (the sender's stack
	 * builds them linear), so one pull and a second pass rather than a
	 * per-access check. */
	len = skb->len < HDR_MAX ? skb->len : HDR_MAX;
	if (bpf_skb_pull_data(skb, len) < 0)
		return punt_via(PUNT(punt_malformed), punt_to);
	verdict = splice_frame(skb, 1, &punt_to);
	return punt_via(verdict == NEED_PULL ? TC_ACT_OK : verdict, punt_to);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
