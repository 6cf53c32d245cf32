/* SPDX-License-Identifier: GPL-2.0 */
/* What sockprobe.bpf.c writes after the probe frame's TCP header; mirrored
 * in daemon/fastpath/sockprobe.py (ctypes), host byte order. */
#ifndef SOCKPROBE_H
#define SOCKPROBE_H

#include <linux/types.h>

/* The program's return codes. */
#define SOCK_PROBE_FOUND 0
#define SOCK_PROBE_NO_SOCKET 1
#define SOCK_PROBE_BAD_FRAME 2

struct sock_probe {
	__u32 state;     /* BPF_TCP_* */
	__u32 ts_recent; /* the peer's newest TSval (RFC 7323 4.3) */
	__u32 rcv_nxt;
	__u32 snd_una;
	__u32 write_seq; /* the next byte the socket's user writes */
	__u32 snd_nxt;   /* the next byte the socket sends */
	__u16 mss_clamp; /* the MSS the peer offered (or the user's clamp) */
	__u16 _pad;
	__u32 txhash;    /* sk_txhash: what an IPv6 socket's automatic flow label comes from */
};

#endif
