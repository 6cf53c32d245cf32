// SPDX-License-Identifier: GPL-2.0
/*
 * What a kernel TCP socket knows and no socket option tells: the peer's
 * newest timestamp (ts_recent, RFC 7323 4.3) and the MSS it offered.
 *
 * A kernel connection handed to the daemon is taken over with TCP_REPAIR
 * (daemon/io/repair.py), which reads sequence numbers, queues and windows
 * but not these two, and a splice needs both: ts_recent is the base of the
 * TSval translation and the floor of pre-splice TSecr values (thesis 5.4.3,
 * daemon/splice/session.py), the peer's MSS bounds what the splice sends it.
 *
 * The program is never attached: the daemon runs it with BPF_PROG_TEST_RUN
 * on a frame it builds, an Ethernet/IP/TCP header whose addresses and
 * ports are the connection's as an arriving segment carries them (source
 * the peer).  It looks the socket up in the caller's network namespace and
 * writes a struct sock_probe over the frame's first bytes after the TCP
 * header.  Field offsets are resolved against the running kernel's BTF when
 * libbpf loads it (CO-RE), so only the fields named here are assumed.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "sockprobe.h"

struct tcp_options_received {
	__u32 ts_recent;
	__u16 mss_clamp;
} __attribute__((preserve_access_index));

struct sock {
	__u32 sk_txhash;
} __attribute__((preserve_access_index));

struct tcp_sock {
	struct tcp_options_received rx_opt;
	__u32 rcv_nxt;
	__u32 snd_una;
	__u32 snd_nxt;
	__u32 write_seq;
} __attribute__((preserve_access_index));

SEC("tc")
int sock_probe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct bpf_sock_tuple t = {};
	struct sock_probe out = {};
	struct bpf_sock *sk;
	struct tcp_sock *tp;
	struct tcphdr *th;
	__u32 tuple_len;

	if ((void *)(eth + 1) > end)
		return SOCK_PROBE_BAD_FRAME;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		th = (void *)(ip + 1);
		if ((void *)(th + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
			return SOCK_PROBE_BAD_FRAME;
		t.ipv4.saddr = ip->saddr;
		t.ipv4.daddr = ip->daddr;
		t.ipv4.sport = th->source;
		t.ipv4.dport = th->dest;
		tuple_len = sizeof(t.ipv4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		th = (void *)(ip6 + 1);
		if ((void *)(th + 1) > end || ip6->nexthdr != IPPROTO_TCP)
			return SOCK_PROBE_BAD_FRAME;
		__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, 16);
		t.ipv6.sport = th->source;
		t.ipv6.dport = th->dest;
		tuple_len = sizeof(t.ipv6);
	} else {
		return SOCK_PROBE_BAD_FRAME;
	}
	if ((void *)(th + 1) + sizeof(out) > end)
		return SOCK_PROBE_BAD_FRAME;

	sk = bpf_sk_lookup_tcp(skb, &t, tuple_len, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return SOCK_PROBE_NO_SOCKET;
	/* The lookup falls back to a listener: only the connection itself will do. */
	if (sk->state != BPF_TCP_ESTABLISHED && sk->state != BPF_TCP_CLOSE_WAIT) {
		bpf_sk_release(sk);
		return SOCK_PROBE_NO_SOCKET;
	}
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp) {
		bpf_sk_release(sk);
		return SOCK_PROBE_NO_SOCKET;
	}
	out.state = sk->state;
	out.ts_recent = tp->rx_opt.ts_recent;
	out.mss_clamp = tp->rx_opt.mss_clamp;
	out.rcv_nxt = tp->rcv_nxt;
	out.snd_una = tp->snd_una;
	out.write_seq = tp->write_seq;
	out.snd_nxt = tp->snd_nxt;
	/* A tcp_sock begins with its struct sock. */
	out.txhash = ((struct sock *)tp)->sk_txhash;
	bpf_sk_release(sk);
	bpf_skb_store_bytes(skb, (void *)(th + 1) - data, &out, sizeof(out), 0);
	return SOCK_PROBE_FOUND;
}

char LICENSE[] SEC("license") = "GPL";
