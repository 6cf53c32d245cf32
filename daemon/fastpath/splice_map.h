/* SPDX-License-Identifier: (GPL-2.0-only OR MIT) */
/*
 * The map layout shared by splice.bpf.c and daemon/fastpath/layout.py.
 *
 * The map is the whole interface between the daemon (control plane) and the
 * tc program: the daemon computes one struct splice_xlate per direction of a
 * splice from its Translator (thesis 5.2-5.4) and the program applies it
 * without deciding anything.  layout.py mirrors these structs with ctypes;
 * tests/test_fastpath.py compiles this header with gcc and checks that every
 * size and offset agrees, so change both together.
 *
 * Every field has an explicit width and natural alignment, and padding is
 * spelled out, so that C and ctypes cannot disagree on hidden holes.
 */
#ifndef SPLICE_MAP_H
#define SPLICE_MAP_H

#include <linux/types.h>

#define SPLICE_MAX_FLOWS_DEFAULT 131072

/* ts_mode: what to do with the timestamp option (TsMode in translator.py). */
#define SPLICE_TS_ABSENT 0 /* neither connection uses timestamps: leave it */
#define SPLICE_TS_MAP 1    /* add tsval_delta / tsecr_delta */
#define SPLICE_TS_STRIP 2  /* only the input connection does: NOP it out */

/* side: the splice's connection an entry's segments arrive on. */
#define SPLICE_SIDE_CLIENT 0
#define SPLICE_SIDE_SERVER 1

/* state: that side's splice state (thesis Fig. 5.1); both SHUTDOWN means
 * TIMEWAIT.  OTHER (a bounded splice's states) is never adopted. */
#define SPLICE_STATE_SPLICED 0
#define SPLICE_STATE_FIN_RELAYED 1
#define SPLICE_STATE_SHUTDOWN 2
#define SPLICE_STATE_OTHER 255

/* family: of a key's packets, or of an entry's output connection.  A
 * splice may join the two families (thesis 7.1's future work, done here):
 * each direction's entry then changes the IP header's family on the way. */
#define SPLICE_AF_INET 4
#define SPLICE_AF_INET6 6

/* The incoming packet's 4-tuple, all in network byte order.  An IPv4
 * address fills the first word of its array; the other three are zero. */
struct splice_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 family;
	__u8 _pad[3];
};

/* One direction of one splice. */
struct splice_xlate {
	/* The output connection's header fields, network byte order: stored
	 * (an IPv4 address in the first word, as in the key). */
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	/* Host byte order, added modulo 2**32 (thesis 5.3, 5.4.1). */
	__u32 seq_delta;
	__u32 ack_delta;
	__u32 tsval_delta;
	__u32 tsecr_delta;
	/* A TSecr before tsecr_floor_in (modular order) becomes tsecr_floor_out. */
	__u32 tsecr_floor_in;
	__u32 tsecr_floor_out;
	/* With fin_watch: punt any segment whose ACK field is >= fin_ack. */
	__u32 fin_ack;
	__u32 egress_ifindex;
	__u16 out_mss;
	__u8 ts_mode;
	__u8 has_tsecr_floor;
	__u8 sack_map;      /* 1: add ack_delta to SACK edges; 0: NOP the option */
	__u8 wnd_in_shift;  /* 0..14 (RFC 7323 2.3) */
	__u8 wnd_out_shift; /* 0..14 */
	__u8 fin_watch;
	/* With has_limit (a bounded splice): only segments wholly before
	 * limit_seq (input space) are relayed; a segment with payload that
	 * reaches it, or an ACK past it, goes to the daemon, which cuts it. */
	__u32 limit_seq;
	__u8 has_limit;
	/* The daemon's own notes, never read by the program: which connection
	 * of the splice these segments arrive on (SPLICE_SIDE_*) and that
	 * side's Fig. 5.1 state (SPLICE_STATE_*), kept current on every
	 * update, so that a daemon restarted after a crash can adopt the
	 * splice from the map alone (daemon/fastpath/adopt.py). */
	__u8 side;
	__u8 state;
	/* 1: both connections negotiated ECN (RFC 3168): the IP ECN field,
	 * ECE and CWR pass unchanged; 0: Not-ECT, ECE and CWR cleared. */
	__u8 ecn;
	/* The output connection's family (SPLICE_AF_*): another than the
	 * packet's makes the program change the IP header's family. */
	__u8 family;
	/* 1: relay nothing yet, send every segment to punt_ifindex as it is.
	 * A kernel connection the daemon is taking over (daemon/io/repair.py)
	 * is held this way while its state is read: none of its segments may
	 * reach the socket meanwhile, or the socket would acknowledge bytes
	 * the splice never sees. */
	__u8 hold;
	__u8 _pad[2];
	/* An IPv6 output connection's flow label (RFC 6437, the daemon's hash
	 * of its 4-tuple: daemon/wire/flowlabel.py), host byte order. */
	__u32 flow_label;
	/* Non-zero: what this entry punts is redirected to this interface (the
	 * daemon's TUN) instead of left to the kernel.  A taken-over kernel
	 * connection's addresses are the host's own: left to the kernel, its
	 * segments would find no socket and be answered with a RST. */
	__u32 punt_ifindex;
	/* Written by the daemon only: what its own relay carried of this
	 * direction (added when the splice goes dormant, or carried over from
	 * a dead daemon's map); payload bytes.  What the program redirects it
	 * counts in the entry's struct splice_count, never here (below). */
	__u64 relay_packets;
	__u64 relay_bytes;
};

/*
 * The program's count of one entry's redirected packets, in a map of its
 * own (splice_counts, the same key).  Written by the program only (atomic
 * adds); the daemon creates it zero with the entry and deletes it with it,
 * and never rewrites it in between.  It cannot live in struct
 * splice_xlate: a hash map's update replaces the whole value, so every
 * update of an entry (a FIN watch, the relay's share added at dormancy)
 * would lose whatever the program counted between the daemon's lookup and
 * its update -- during a bulk transfer, tens of KB per GSO packet.
 */
struct splice_count {
	__u64 packets;
	__u64 bytes; /* payload bytes */
};

/* The per-CPU global counters (one element); layout.py reads the names. */
struct splice_stats {
	__u64 redirected_packets;
	__u64 redirected_bytes;
	__u64 punt_no_flow;
	__u64 punt_flags;                  /* SYN, FIN, RST, URG or no ACK */
	__u64 punt_ip_options_or_fragment;
	__u64 punt_tcp_options_layout;     /* not one of Linux's fixed layouts */
	__u64 punt_mss;                    /* payload or gso_size > out_mss */
	__u64 punt_fin_watch;              /* may acknowledge a relayed FIN */
	__u64 punt_malformed;              /* lengths that do not add up */
	__u64 dropped_rewrite_failed;      /* a checksum helper failed mid-rewrite */
	__u64 punt_limit;                  /* reaches a bounded splice's limit */
	__u64 punt_mtu;                    /* too big for the egress link (RFC 1191) */
	__u64 redirected_family_changed;   /* of the redirected, IPv4 <-> IPv6 */
	__u64 gso_recut;                   /* GSO packets given gso_size out_mss */
	__u64 held;                        /* of the punted: of a held entry */
	__u64 punt_redirected;             /* punts sent to an entry's punt_ifindex */
};

#endif /* SPLICE_MAP_H */
