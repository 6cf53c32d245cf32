"""Load the fast path's tc program, attach it, and fill its flow map.

Read first: DESIGN.md "The kernel fast path for spliced flows" (why a tc
program, where it attaches, the pitfalls), daemon/fastpath/splice.bpf.c
(what the program does with an entry), daemon/fastpath/layout.py (the
entry's layout).

The program is attached at clsact *ingress* of the proxy namespace's
external links, in the network namespace of the thread that calls
``FastPath.open``.  The daemon installs one entry per direction of a splice
once both directions are spliced (the entry needs an ``ack_delta``); from
then on matching segments are rewritten and redirected in the kernel and
never reach the TUN.  Everything else, and every segment the daemon must
see (SYN/FIN/RST, options it does not know, the ACK of a FIN it relayed:
``watch_fin_ack``), is punted into the normal path.

Counters.  What the program redirects it counts per entry in a map of its
own, ``splice_counts`` (same key), which the daemon creates zero with the
entry, reads, and deletes with it, but never rewrites: a hash map's update
replaces the whole value, so a count kept in the entry itself lost what
the program counted between each update's lookup and its write (a FIN
watch, the relay's share added at dormancy; a bulk transfer's GSO packets
are tens of KB each).  The entry keeps only the daemon's own share
(``relay_packets``, ``relay_bytes``: ``add_counters``); ``counters`` and
``remove`` sum both.

Ownership.  ``close`` removes exactly what ``open`` made: its own filters
(by handle and priority, which the kernel picked, so two instances never
collide) and a clsact qdisc only where this instance created it and no other
filter is left on it.  It does so in the namespace ``open`` ran in, whatever
thread calls it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from daemon.fastpath import libbpf
from daemon.fastpath.layout import (
    MAX_FLOWS_DEFAULT,
    FlowKey,
    SpliceCount,
    SpliceKey,
    SpliceStats,
    SpliceXlate,
    decode_key,
    encode,
    encode_key,
    family_of,
    hold_entry,
    state_code,
)
from daemon.splice.state import Iface, SpliceState

if TYPE_CHECKING:
    from daemon.splice.translator import Translator

__all__ = [
    "DEFAULT_OBJECT",
    "TC_ACT_OK",
    "TC_ACT_REDIRECT",
    "TC_ACT_SHOT",
    "FastPath",
    "FastPathUnavailable",
    "FlowKey",
    "StaleFilter",
    "detach_stale",
    "find_stale",
    "flows_map_of",
    "read_flows",
    "read_flows_of",
]

log = logging.getLogger("daemon.fastpath")

# Built by `make fastpath` (never at run time), relative to the repository root.
DEFAULT_OBJECT = Path(__file__).resolve().parents[2] / "build" / "fastpath" / "splice.bpf.o"
PROGRAM = b"splice_ingress"
FLOWS_MAP = b"splice_flows"
COUNTS_MAP = b"splice_counts"
STATS_MAP = b"splice_stats"

TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

# clsact's two pseudo-parents (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS/EGRESS)).
_CLSACT_PARENTS = (0xFFFFFFF2, 0xFFFFFFF3)
_CLONE_NEWNET = 0x40000000
_ENOTSUPP = 524  # the kernel's internal "not supported", as bpf(2) reports it
_VERIFIER_LINES = 8


class FastPathUnavailable(Exception):
    """The fast path cannot run here; ``str()`` is a one-line reason for the log."""


@dataclass(slots=True)
class _Filter:
    """One filter this instance attached (the kernel chose handle and priority)."""

    ifindex: int
    handle: int
    priority: int
    clsact: tuple[int, int, int] | None  # the key in _created, if one of ours


# A clsact qdisc that a FastPath of this process created, keyed by (netns
# device, netns inode, ifindex), with how many instances here attach to it:
# the last of them to close removes it, whichever created it.  Filters of
# other processes keep it alive too (_filters_left).
_created: dict[tuple[int, int, int], int] = {}
_created_lock = threading.Lock()


class FastPath:
    """A loaded splice program, its flow map, and the filters that run it."""

    def __init__(
        self, obj: int, prog_fd: int, flows_fd: int, stats_fd: int, counts_fd: int
    ) -> None:
        """Use ``open`` or ``load_only``."""
        self._obj: int | None = obj
        self._prog_fd = prog_fd
        self._flows_fd = flows_fd
        self._stats_fd = stats_fd
        self._counts_fd = counts_fd
        self._filters: list[_Filter] = []
        self._netns_fd: int | None = None
        self._lock = threading.Lock()

    # --- life cycle --------------------------------------------------------------

    @classmethod
    def load_only(
        cls, *, obj_path: Path = DEFAULT_OBJECT, max_flows: int = MAX_FLOWS_DEFAULT
    ) -> FastPath:
        """Load the program and its maps without attaching (BPF_PROG_TEST_RUN, tests)."""

        def size_the_map(obj: int) -> None:
            lb = libbpf.lib()
            for name in (FLOWS_MAP, STATS_MAP, COUNTS_MAP):
                if not lb.find_map_by_name(obj, name):
                    raise FastPathUnavailable(f"{obj_path} has no {name.decode()} map")
            for name in (FLOWS_MAP, COUNTS_MAP):  # one count per entry
                ret = lb.map_set_max_entries(lb.find_map_by_name(obj, name), max_flows)
                if ret < 0:
                    raise FastPathUnavailable(f"max_flows={max_flows}: {libbpf.strerror(ret)}")

        obj, prog_fd = load_object(obj_path, PROGRAM, size_the_map)
        lb = libbpf.lib()
        fds = [lb.map_fd(lb.find_map_by_name(obj, n)) for n in (FLOWS_MAP, STATS_MAP, COUNTS_MAP)]
        return cls(obj, prog_fd, *fds)

    @classmethod
    def open(
        cls,
        ifindexes: Sequence[int],
        *,
        obj_path: Path = DEFAULT_OBJECT,
        max_flows: int = MAX_FLOWS_DEFAULT,
        preload: Sequence[tuple[FlowKey, SpliceXlate]] = (),
    ) -> FastPath:
        """Load the program and attach it at clsact ingress of each link.

        Works in the calling thread's network namespace; a clsact qdisc is
        created where missing (and remembered, so that ``close`` removes
        only those).  On any failure nothing is left attached.
        ``preload``: map entries written before the program is attached
        (splices a dead daemon's map carried, ``read_flows_of``), so that
        not one of their segments meets the program without its entry.
        """
        fp = cls.load_only(obj_path=obj_path, max_flows=max_flows)
        try:
            for key, value in preload:
                try:
                    fp._put(key, value, libbpf.BPF_NOEXIST)
                except OSError as exc:  # e.g. a smaller max_flows: relayed in Python
                    log.warning("could not carry a flow over into the new map: %s", exc)
            fp._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            for ifindex in ifindexes:
                fp._attach(ifindex)
        except BaseException:
            fp.close()
            raise
        return fp

    def _attach(self, ifindex: int) -> None:
        lb = libbpf.lib()
        ns = os.stat("/proc/thread-self/ns/net")
        key = (ns.st_dev, ns.st_ino, ifindex)
        hook = _hook(ifindex, libbpf.BPF_TC_INGRESS)
        with _created_lock:
            ret = lb.tc_hook_create(ctypes.byref(hook))
            if ret < 0 and ret != -errno.EEXIST:
                raise FastPathUnavailable(
                    f"clsact on ifindex {ifindex}: {libbpf.strerror(ret)}{_privilege_hint(ret)}"
                )
            if ret == 0:
                _created[key] = 0
            opts = libbpf.TcOpts(sz=ctypes.sizeof(libbpf.TcOpts), prog_fd=self._prog_fd)
            ret = lb.tc_attach(ctypes.byref(hook), ctypes.byref(opts))
            if ret < 0:
                if _created.get(key) == 0:
                    del _created[key]
                    _destroy_clsact(ifindex)
                raise FastPathUnavailable(
                    f"attach to ifindex {ifindex}: {libbpf.strerror(ret)}{_privilege_hint(ret)}"
                )
            claim = None
            if key in _created:
                _created[key] += 1
                claim = key
        self._filters.append(_Filter(ifindex, opts.handle, opts.priority, claim))

    def close(self) -> None:
        """Detach this instance's filters, remove clsact where it made it, free the maps.

        Idempotent.  Links that vanished meanwhile (their namespace removed)
        are skipped silently: their filters went with them.
        """
        with self._lock:
            filters, self._filters = self._filters, []
            if filters and self._netns_fd is not None:
                with _netns(self._netns_fd):
                    for f in filters:
                        _detach(f)
            self._release()

    def abandon(self) -> None:
        """Close this instance's descriptors but leave its filters attached.

        The filters hold the program and the program its map: the splices
        in the map keep flowing in the kernel, and the next daemon finds
        the filters stale (``find_stale``) and adopts what the map holds.
        """
        with self._lock:
            self._filters = []
            self._release()

    def _release(self) -> None:
        """Close the namespace fd and the object (its program and map fds); idempotent."""
        if self._netns_fd is not None:
            os.close(self._netns_fd)
            self._netns_fd = None
        if self._obj is not None:
            libbpf.lib().object_close(self._obj)
            self._obj = None

    def __enter__(self) -> FastPath:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def attached(self) -> list[tuple[int, int, int]]:
        """(ifindex, handle, priority) of each filter this instance attached."""
        return [(f.ifindex, f.handle, f.priority) for f in self._filters]

    # --- the flow map ------------------------------------------------------------

    def install(
        self,
        key: FlowKey,
        t: Translator,
        egress_ifindex: int,
        limit: int | None = None,
        fin_ack: int | None = None,
        side: Iface = Iface.CLIENT,
        state: SpliceState = SpliceState.SPLICED,
        out: tuple[bytes, bytes] | None = None,
        punt_ifindex: int = 0,
    ) -> None:
        """Offload the direction whose incoming packets carry ``key``; counters restart.

        ``t`` must be fully spliced (``t.ack_delta`` not None), else ValueError.
        ``limit``: relay only segments wholly before this sequence number
        (a bounded splice; ``encode``).  ``fin_ack``: watch for that ACK
        from the first packet on, in the same update: an entry without its
        watch, even for one syscall, could relay the very ACK the daemon
        waits for (a relayed FIN's, or a bounded splice's last byte's).
        ``side``/``state``: which connection ``key`` is and its Fig. 5.1
        state, kept in the entry for a daemon that adopts it (``encode``).
        ``out``: the output connection's (source, destination) addresses
        when ``t`` holds placeholders for them (an IPv6 connection).
        ``punt_ifindex``: what the entry punts goes there, not to the kernel.
        """
        value = encode(t, egress_ifindex, limit, fin_ack, side, state, out, punt_ifindex)
        self._put(key, value, libbpf.BPF_ANY)

    def hold(self, key: FlowKey, punt_ifindex: int) -> None:
        """Send every segment carrying ``key`` to ``punt_ifindex`` untouched (``hold_entry``)."""
        self._update(key, hold_entry(family_of(key[0]), punt_ifindex), libbpf.BPF_ANY)

    def watch_fin_ack(
        self, key: FlowKey, fin_ack: int | None, state: SpliceState | None = None
    ) -> None:
        """Punt, from now on, every segment of ``key`` whose ACK field is >= ``fin_ack``.

        For the ACK of a FIN the daemon relayed: only the daemon knows what
        it closes.  ``None`` ends the watch once that ACK was seen (a
        half-closed splice keeps carrying the other direction in the
        kernel).  Raises KeyError if ``key`` is not installed.  The value
        is replaced whole (hash maps have no partial update); the program
        never writes it (its counts are in ``splice_counts``), so nothing
        of it is lost in between.
        ``state``: the side's Fig. 5.1 state after the change, if it moved.
        """
        value = self._lookup(key)
        if value is None:
            raise KeyError(key)
        if state is not None:
            value.state = state_code(state)
        value.fin_watch = 0 if fin_ack is None else 1
        value.fin_ack = 0 if fin_ack is None else fin_ack & 0xFFFFFFFF
        self._update(key, value, libbpf.BPF_EXIST)

    def remove(self, key: FlowKey) -> tuple[int, int]:
        """Stop offloading ``key``; its final (packets, payload bytes), (0, 0) if absent.

        The entry goes first, its count after it: the program counts no
        packet once the entry is gone, so the count read then is final.
        """
        k = encode_key(key)
        value = SpliceXlate()
        found = _take(self._flows_fd, k, value, "remove")
        count = SpliceCount()
        counted = _take(self._counts_fd, k, count, "remove the count")
        packets = (value.relay_packets if found else 0) + (count.packets if counted else 0)
        nbytes = (value.relay_bytes if found else 0) + (count.bytes if counted else 0)
        return (packets, nbytes)

    def entry(self, key: FlowKey) -> SpliceXlate | None:
        """The entry of ``key`` as the kernel holds it now, or None."""
        return self._lookup(key)

    def add_counters(self, key: FlowKey, packets: int, nbytes: int) -> None:
        """Add to an entry's relay share (what the daemon relayed itself, kept with the kernel's).

        Replaces the entry whole, like ``watch_fin_ack``, and like it loses
        nothing: the program's own count is not in the entry.  KeyError if
        absent.
        """
        value = self._lookup(key)
        if value is None:
            raise KeyError(key)
        value.relay_packets += packets
        value.relay_bytes += nbytes
        self._update(key, value, libbpf.BPF_EXIST)

    def counters(self, key: FlowKey) -> tuple[int, int]:
        """(packets, payload bytes) of ``key`` so far: the program's count plus the relay
        share; (0, 0) if absent."""
        k = encode_key(key)
        value, count = SpliceXlate(), SpliceCount()
        if not _get(self._flows_fd, k, value, "lookup"):
            return (0, 0)
        _get(self._counts_fd, k, count, "count lookup")  # none: zero
        return (value.relay_packets + count.packets, value.relay_bytes + count.bytes)

    def global_stats(self) -> dict[str, int]:
        """The program's global counters summed over CPUs, by their splice_map.h names."""
        lb = libbpf.lib()
        ncpus = lb.num_possible_cpus()
        if ncpus <= 0:
            raise _os_error(ncpus, "libbpf_num_possible_cpus")
        per_cpu = (SpliceStats * ncpus)()
        zero = ctypes.c_uint32(0)
        ret = lb.map_lookup_elem(self._stats_fd, ctypes.byref(zero), ctypes.byref(per_cpu))
        if ret < 0:
            raise _os_error(ret, "splice_stats lookup")
        names = [field[0] for field in SpliceStats._fields_]
        return {name: sum(getattr(cpu, name) for cpu in per_cpu) for name in names}

    def _lookup(self, key: FlowKey) -> SpliceXlate | None:
        value = SpliceXlate()
        return value if _get(self._flows_fd, encode_key(key), value, "lookup") else None

    def _put(self, key: FlowKey, value: SpliceXlate, flags: int) -> None:
        """A new entry for ``key`` with its count at zero (the count first: no
        packet the entry redirects goes uncounted)."""
        lb = libbpf.lib()
        k = encode_key(key)
        zero = ctypes.byref(SpliceCount())
        ret = lb.map_update_elem(self._counts_fd, ctypes.byref(k), zero, libbpf.BPF_ANY)
        if ret < 0:
            raise _os_error(ret, "count update")
        try:
            self._update(key, value, flags)
        except BaseException:
            if self._lookup(key) is None:  # no entry: no count either
                lb.map_delete_elem(self._counts_fd, ctypes.byref(k))
            raise

    def _update(self, key: FlowKey, value: SpliceXlate, flags: int) -> None:
        k = encode_key(key)
        ret = libbpf.lib().map_update_elem(
            self._flows_fd, ctypes.byref(k), ctypes.byref(value), flags
        )
        if ret < 0:
            if flags == libbpf.BPF_EXIST and libbpf.errno_of(ret) == errno.ENOENT:
                raise KeyError(key)
            raise _os_error(ret, "update")

    # --- BPF_PROG_TEST_RUN ---------------------------------------------------------

    def test_run(self, frame: bytes, *, gso_size: int = 0) -> tuple[int, bytes]:
        """Run the program once on an Ethernet ``frame``: (tc verdict, frame after it).

        ``gso_size`` makes the kernel's test skb a GSO one (its shinfo), as
        veth delivers TSO traffic.  Map side effects (counters) are real.
        """
        verdict, out, _ns = self._run(frame, gso_size=gso_size, repeat=1)
        return verdict, out

    def time_run(self, frame: bytes, *, repeat: int = 100_000, gso_size: int = 0) -> int:
        """The program's mean cost in ns over ``repeat`` runs on one skb.

        The runs share one skb: after the first the frame is already
        rewritten, so a caller measuring the rewrite installs the reverse
        mapping too (the frame then bounces between the two entries).
        """
        return self._run(frame, gso_size=gso_size, repeat=repeat)[2]

    def _run(self, frame: bytes, *, gso_size: int, repeat: int) -> tuple[int, bytes, int]:
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 256)
        opts = libbpf.TestRunOpts(
            sz=ctypes.sizeof(libbpf.TestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(data_out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(data_out),
            repeat=repeat,
        )
        ctx = libbpf.SkbContext(gso_size=gso_size)
        if gso_size:
            opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
            opts.ctx_size_in = ctypes.sizeof(ctx)
        ret = libbpf.lib().prog_test_run_opts(self._prog_fd, ctypes.byref(opts))
        if ret < 0:
            raise _os_error(ret, "BPF_PROG_TEST_RUN")
        return opts.retval, data_out.raw[: opts.data_size_out], opts.duration


# --- helpers ---------------------------------------------------------------------


def _hook(ifindex: int, attach_point: int) -> libbpf.TcHook:
    return libbpf.TcHook(
        sz=ctypes.sizeof(libbpf.TcHook), ifindex=ifindex, attach_point=attach_point
    )


def _detach(f: _Filter) -> None:
    lb = libbpf.lib()
    hook = _hook(f.ifindex, libbpf.BPF_TC_INGRESS)
    opts = libbpf.TcOpts(sz=ctypes.sizeof(libbpf.TcOpts), handle=f.handle, priority=f.priority)
    with _created_lock:
        # ENOENT/ENODEV/EINVAL: the filter or the link is gone already.
        lb.tc_detach(ctypes.byref(hook), ctypes.byref(opts))
        if f.clsact is None:
            return
        _created[f.clsact] -= 1
        if _created[f.clsact] == 0:
            del _created[f.clsact]
            if not _filters_left(f.ifindex):
                _destroy_clsact(f.ifindex)


@dataclass(frozen=True, slots=True)
class StaleFilter:
    """Our program's filter on a link, left by a daemon that died."""

    ifindex: int
    handle: int
    priority: int
    prog_id: int | None  # from TCA_BPF_NAME; None if the name did not carry it


def find_stale(ifindex: int) -> list[StaleFilter]:
    """Our program's filters on a link that no live process runs any more.

    A daemon killed without ``close`` leaves its filter attached, and its
    map still maps the 4-tuples of its splices: they keep flowing in the
    kernel with nobody to see their FINs.  A filter is ours when libbpf
    named it after our program (``TCA_BPF_NAME`` "splice_ingress:[id]"),
    and stale when no process holds a descriptor of its program any more:
    a live daemon keeps its program's fd open for as long as it runs, so
    another daemon in the same namespace (a second TUN, another prefix)
    keeps its filters.  Call in the link's namespace.
    """
    from pyroute2 import IPRoute

    prefix = PROGRAM.decode() + ":"
    candidates: list[StaleFilter] = []
    with IPRoute() as ipr:
        for msg in ipr.get_filters(index=ifindex, parent=_CLSACT_PARENTS[0]):
            options = msg.get_attr("TCA_OPTIONS")
            name = options.get_attr("TCA_BPF_NAME") if options is not None else None
            if msg["handle"] and isinstance(name, str) and name.startswith(prefix):
                # The kernel names the program's id in TCA_BPF_NAME ("name:[id]");
                # pyroute2 does not decode TCA_BPF_ID.
                tail = name[len(prefix) :]
                prog_id = int(tail[1:-1]) if tail[1:-1].isdigit() else None
                candidates.append(StaleFilter(ifindex, msg["handle"], msg["info"] >> 16, prog_id))
    if not candidates:
        return []
    held = held_prog_ids()
    return [f for f in candidates if f.prog_id is None or f.prog_id not in held]


def detach(f: StaleFilter) -> None:
    """Detach a filter found by ``find_stale`` (gone already is fine)."""
    _detach(_Filter(f.ifindex, f.handle, f.priority, None))


def _get(map_fd: int, k: SpliceKey, value: ctypes.Structure, what: str) -> bool:
    """Look ``k`` up in ``map_fd`` into ``value``; False if absent."""
    ret = libbpf.lib().map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(value))
    if ret < 0:
        if libbpf.errno_of(ret) == errno.ENOENT:
            return False
        raise _os_error(ret, what)
    return True


def _take(map_fd: int, k: SpliceKey, value: ctypes.Structure, what: str) -> bool:
    """Look ``k`` up in ``map_fd`` into ``value`` and delete it; False if absent."""
    lb = libbpf.lib()
    ret = lb.map_lookup_and_delete_elem(map_fd, ctypes.byref(k), ctypes.byref(value))
    if ret < 0 and libbpf.errno_of(ret) in (errno.EINVAL, errno.EOPNOTSUPP, _ENOTSUPP):
        # Kernels before 5.14 cannot look up and delete a hash entry at once.
        ret = lb.map_lookup_elem(map_fd, ctypes.byref(k), ctypes.byref(value))
        if ret == 0:
            lb.map_delete_elem(map_fd, ctypes.byref(k))
    if ret < 0:
        if libbpf.errno_of(ret) == errno.ENOENT:
            return False
        raise _os_error(ret, what)
    return True


def detach_stale(ifindex: int) -> int:
    """Detach our program's filters left on a link by a daemon that died; how many."""
    stale = find_stale(ifindex)
    for f in stale:
        detach(f)
    return len(stale)


def read_flows_of(prog_id: int) -> list[tuple[FlowKey, SpliceXlate]]:
    """The flow map entries of a program that is still loaded (a stale filter's).

    The filter holds the program and the program its maps, so a dead
    daemon's map outlives it without being pinned: found by the program's
    id (BPF_PROG_GET_FD_BY_ID, which needs CAP_SYS_ADMIN), then its map
    named ``splice_flows``.  Raises OSError if it cannot be read, and
    ValueError if that map's key or value size is not this daemon's
    layout (another version wrote it: nothing of it can be trusted).
    What the program counted (its ``splice_counts``) is added to each
    entry's relay share: the new map's entries start their counts at zero.
    """
    fd = flows_map_of(prog_id)
    try:
        flows = read_flows(fd)
    finally:
        os.close(fd)
    counts_fd = _map_of(prog_id, COUNTS_MAP, ctypes.sizeof(SpliceCount))
    if counts_fd is None:  # a program that kept its counts in the entries
        return flows
    try:
        for key, value in flows:
            count = SpliceCount()
            if _get(counts_fd, encode_key(key), count, "count lookup"):
                value.relay_packets += count.packets
                value.relay_bytes += count.bytes
    finally:
        os.close(counts_fd)
    return flows


def flows_map_of(prog_id: int) -> int:
    """A new fd of the ``splice_flows`` map of program ``prog_id`` (the caller closes it).

    Raises as ``read_flows_of``.
    """
    fd = _map_of(prog_id, FLOWS_MAP, ctypes.sizeof(SpliceXlate))
    if fd is None:
        raise ValueError(f"program {prog_id} has no {FLOWS_MAP.decode()} map")
    return fd


def _map_of(prog_id: int, name: bytes, value_size: int) -> int | None:
    """A new fd of program ``prog_id``'s map ``name`` (splice_key keys); None if it has none.

    Raises OSError if it cannot be read, ValueError if its sizes are not ours.
    """
    lb = libbpf.lib()
    prog_fd = lb.prog_get_fd_by_id(prog_id)
    if prog_fd < 0:
        raise _os_error(prog_fd, f"program {prog_id}")
    try:
        ids = (ctypes.c_uint32 * 8)()
        info = libbpf.ProgInfo(nr_map_ids=len(ids), map_ids=ctypes.addressof(ids))
        size = ctypes.c_uint32(ctypes.sizeof(info))
        ret = lb.obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size))
        if ret < 0:
            raise _os_error(ret, f"program {prog_id} info")
        map_ids = list(ids[: min(info.nr_map_ids, len(ids))])
    finally:
        os.close(prog_fd)
    for map_id in map_ids:
        map_fd = lb.map_get_fd_by_id(map_id)
        if map_fd < 0:
            raise _os_error(map_fd, f"map {map_id}")
        minfo = libbpf.MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(minfo))
        ret = lb.obj_get_info_by_fd(map_fd, ctypes.byref(minfo), ctypes.byref(size))
        want = (ctypes.sizeof(SpliceKey), value_size)
        if ret < 0 or minfo.name != name or (minfo.key_size, minfo.value_size) != want:
            os.close(map_fd)
            if ret < 0:
                raise _os_error(ret, f"map {map_id} info")
            if minfo.name == name:
                raise ValueError(
                    f"map {map_id}: key/value of {minfo.key_size}/{minfo.value_size} bytes,"
                    f" this daemon's are {want[0]}/{want[1]}"
                )
            continue
        return int(map_fd)
    return None


def read_flows(map_fd: int) -> list[tuple[FlowKey, SpliceXlate]]:
    """Every entry of the flow map ``map_fd``, as (key, value)."""
    lb = libbpf.lib()
    out: list[tuple[FlowKey, SpliceXlate]] = []
    key, nxt = SpliceKey(), SpliceKey()
    prev: SpliceKey | None = None
    while True:
        ret = lb.map_get_next_key(
            map_fd, ctypes.byref(prev) if prev is not None else None, ctypes.byref(nxt)
        )
        if ret < 0:
            if libbpf.errno_of(ret) == errno.ENOENT:
                return out  # the last key
            raise _os_error(ret, "map walk")
        ctypes.memmove(ctypes.byref(key), ctypes.byref(nxt), ctypes.sizeof(key))
        prev = key
        value = SpliceXlate()
        ret = lb.map_lookup_elem(map_fd, ctypes.byref(key), ctypes.byref(value))
        if ret == 0:
            out.append((decode_key(key), value))
        elif libbpf.errno_of(ret) != errno.ENOENT:  # deleted meanwhile: skip it
            raise _os_error(ret, "map read")


def held_prog_ids() -> set[int]:
    """Ids of the BPF programs some process holds a descriptor of (/proc/*/fdinfo).

    The fdinfo of a program's fd names it ("prog_id:"); a filter alone does
    not appear here, so this is the set of programs somebody still runs.
    """
    held: set[int] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "anon_inode:bpf-prog":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("prog_id:"):
                            held.add(int(line.split()[1]))
                            break
            except (OSError, ValueError):
                continue
    return held


def _destroy_clsact(ifindex: int) -> None:
    # Both attach points at once means "the qdisc"; INGRESS alone would
    # mean "every ingress filter", other owners' included.
    hook = _hook(ifindex, libbpf.BPF_TC_INGRESS | libbpf.BPF_TC_EGRESS)
    libbpf.lib().tc_hook_destroy(ctypes.byref(hook))


def _filters_left(ifindex: int) -> bool:
    """Whether any tc filter (another owner's) remains on the link's clsact."""
    from pyroute2 import IPRoute  # netlink dumps; libbpf has no call for them

    try:
        with IPRoute() as ipr:
            return any(
                msg.get("kind") is not None
                for parent in _CLSACT_PARENTS
                for msg in ipr.get_filters(index=ifindex, parent=parent)
            )
    except Exception:
        return True  # when in doubt leave the qdisc: an empty clsact is harmless


@contextmanager
def _netns(fd: int) -> Iterator[None]:
    """Run the body in the network namespace ``fd`` (this thread only), then come back."""
    target = os.fstat(fd)
    here = os.stat("/proc/thread-self/ns/net")
    if (target.st_dev, target.st_ino) == (here.st_dev, here.st_ino):
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns.
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _os_error(ret: int, what: str) -> OSError:
    err = libbpf.errno_of(ret)
    return OSError(err, f"splice fast path {what}: {os.strerror(err)}")


def _privilege_hint(ret: int) -> str:
    if libbpf.errno_of(ret) == errno.EPERM:
        return " (needs root, or CAP_BPF and CAP_NET_ADMIN)"
    return ""


def load_object(
    obj_path: Path, program: bytes, configure: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Open and load a BPF object that `make fastpath` built: (the object, ``program``'s fd).

    ``configure`` gets the opened object before it is loaded (map sizes).
    Any failure is FastPathUnavailable with a one-line reason (the
    verifier's last words, a missing privilege), and nothing stays open.
    """
    if not obj_path.is_file():
        raise FastPathUnavailable(f"{obj_path} is missing: run `make fastpath`")
    try:
        lb = libbpf.lib()
    except libbpf.LibbpfMissing as e:
        raise FastPathUnavailable(str(e)) from None
    with lb.capture_log() as messages:
        obj = lb.object_open_file(str(obj_path).encode(), None)
        if not obj:
            err = ctypes.get_errno()
            raise FastPathUnavailable(f"cannot open {obj_path}: {os.strerror(err)}")
        try:
            if configure is not None:
                configure(obj)
            ret = lb.object_load(obj)
            if ret < 0:
                raise FastPathUnavailable(_load_failure(obj_path, ret, list(messages)))
            prog = lb.find_program_by_name(obj, program)
            if not prog:
                raise FastPathUnavailable(f"{obj_path} has no {program.decode()} program")
            return obj, lb.program_fd(prog)
        except BaseException:
            lb.object_close(obj)
            raise


def _load_failure(obj_path: Path, ret: int, messages: list[str]) -> str:
    """One line: why the kernel refused the object, with the verifier's last words."""
    err = libbpf.errno_of(ret)
    if err == errno.EPERM:
        return f"loading {obj_path.name}: {os.strerror(err)}{_privilege_hint(ret)}"
    log: list[str] = []
    inside = False
    for line in messages:
        if "BEGIN PROG LOAD LOG" in line:
            inside, log = True, []
        elif "END PROG LOAD LOG" in line:
            inside = False
        elif inside and line.strip():
            log.append(line.strip())
    if log:
        return f"the verifier refused {obj_path.name}: {' | '.join(log[-_VERIFIER_LINES:])}"
    tail = [m.strip() for m in messages[-3:] if m.strip()]
    return f"loading {obj_path.name} failed ({os.strerror(err)}): {' | '.join(tail)}"
