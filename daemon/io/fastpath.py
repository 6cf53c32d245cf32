"""The daemon's side of the kernel fast path: which links, which egress, on/off/auto.

daemon/fastpath loads the tc program and fills its map; this module decides
where it runs for the daemon and answers the two questions the splicer has
at install time:

* *Where to attach*: clsact ingress of every Ethernet link of the daemon's
  network namespace (not the TUN, not loopback).  A spliced segment is then
  rewritten and redirected as it arrives, before the kernel's IP layer sees
  it: no forwarding pass, no TUN copy.  The other choice, egress of the TUN,
  would keep the program on a device the daemon owns but costs the whole
  forwarding path first (docs/architecture.md has the reasoning and the
  numbers).  Links that appear after the daemon started carry no fast path.
* *Which egress*: the kernel's own route toward the output peer
  (``RTM_GETROUTE``), asked once per destination address and cached; the
  program's ``bpf_redirect_neigh`` then resolves the next hop's MAC.

``--fastpath auto`` (the default) falls back to the Python relay with one
log line when BPF is unavailable (no privilege, object not built, verifier
refusal); ``on`` makes that an error; ``off`` never loads it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Any, Literal

from pyroute2 import IPRoute

from daemon.fastpath import DEFAULT_OBJECT, FastPath, FastPathUnavailable
from daemon.fastpath.adopt import InheritedSplice, adoptable
from daemon.fastpath.layout import FlowKey, SpliceXlate
from daemon.fastpath.loader import StaleFilter, detach, find_stale, read_flows_of
from daemon.splice.state import Iface, SpliceState
from daemon.splice.translator import Translator

log = logging.getLogger("daemon.fastpath")

FastPathMode = Literal["auto", "on", "off"]
_ARPHRD_ETHER = 1
RelayKey = tuple[bytes, int, bytes, int]


class KernelFastPath:
    """A loaded and attached FastPath plus the egress lookup (the splicer's FastPathPort)."""

    def __init__(
        self, fp: FastPath, links: dict[int, str], inherited: list[InheritedSplice] | None = None
    ) -> None:
        self.fp = fp
        self.links = links
        # Splices a dead daemon left in the kernel, preloaded into fp's map:
        # the daemon gives them relays (Splicer.adopt) before its loop runs.
        self.inherited = inherited or []
        self._ipr = IPRoute()
        self._egress: dict[bytes, int | None] = {}

    def install(
        self,
        key: RelayKey,
        t: Translator,
        egress_ifindex: int,
        limit: int | None = None,
        fin_ack: int | None = None,
        side: Iface = Iface.CLIENT,
        state: SpliceState = SpliceState.SPLICED,
        out: tuple[bytes, bytes] | None = None,
        punt_ifindex: int = 0,
    ) -> None:
        self.fp.install(key, t, egress_ifindex, limit, fin_ack, side, state, out, punt_ifindex)

    def hold(self, key: RelayKey, punt_ifindex: int) -> None:
        self.fp.hold(key, punt_ifindex)

    def watch_fin_ack(
        self, key: RelayKey, fin_ack: int | None, state: SpliceState | None = None
    ) -> None:
        self.fp.watch_fin_ack(key, fin_ack, state)

    def remove(self, key: RelayKey) -> tuple[int, int]:
        return self.fp.remove(key)

    def counters(self, key: RelayKey) -> tuple[int, int]:
        return self.fp.counters(key)

    def entry(self, key: RelayKey) -> SpliceXlate | None:
        return self.fp.entry(key)

    def add_counters(self, key: RelayKey, packets: int, nbytes: int) -> None:
        self.fp.add_counters(key, packets, nbytes)

    def egress(self, addr: bytes) -> int | None:
        """The ifindex the kernel routes ``addr`` out of, if it is one we attached to."""
        if addr in self._egress:
            return self._egress[addr]
        ifindex: int | None = None
        try:
            routes = self._ipr.route("get", dst=str(ipaddress.ip_address(addr)))
            for r in routes:
                oif = r.get_attr("RTA_OIF")
                if oif is not None:
                    ifindex = int(oif)
                    break
        except Exception as exc:  # netlink errors: no route; the splice stays in Python
            log.warning("no route toward %s: %s", ipaddress.ip_address(addr), exc)
        # The program forwards out of any device, but a link it is not
        # attached to would see the reverse direction punted every time.
        if ifindex is not None and ifindex not in self.links:
            ifindex = None
        self._egress[addr] = ifindex
        return ifindex

    def status(self) -> dict[str, Any]:
        return {
            "running": True,
            "links": sorted(self.links.values()),
            "counters": self.fp.global_stats(),
        }

    def close(self, detach: bool = True) -> None:
        """Stop; ``detach=False`` leaves the filters and map to the next daemon."""
        if detach:
            self.fp.close()
        else:
            self.fp.abandon()
        self._ipr.close()


def external_links(tun_name: str) -> dict[int, str]:
    """Ethernet links of this namespace: every one a spliced segment may arrive on."""
    out: dict[int, str] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if link["ifi_type"] == _ARPHRD_ETHER and name not in ("lo", tun_name):
                out[int(link["index"])] = str(name)
    return out


def start_fast_path(
    mode: FastPathMode,
    tun_name: str,
    obj_path: Path = DEFAULT_OBJECT,
    max_flows: int = 131072,
    *,
    prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None,
    offload: bool = True,
) -> tuple[KernelFastPath | None, str]:
    """Load and attach the program as ``mode`` says; (None, reason) when it does not run.

    A dead daemon's filters on the links are replaced: the splices in its
    map that belong to ``prefixes`` are carried into the new map before the
    new program runs (``KernelFastPath.inherited``, daemon/fastpath/adopt.py),
    and the old filters are detached once it does.  Raises
    FastPathUnavailable only in mode "on".
    """
    if mode == "off":
        return None, "off (--fastpath off)"
    stale: list[StaleFilter] = []
    try:
        links = external_links(tun_name)
        if not links:
            raise FastPathUnavailable("no Ethernet link in this namespace to attach to")
        for ifindex in links:
            try:
                stale += find_stale(ifindex)
            except Exception as exc:  # a dump that fails must not keep the daemon down
                log.warning("could not look for a stale fast path on %s: %s", links[ifindex], exc)
        inherited = _inherit(stale, links, prefixes or [], offload, tun_name)
        preload: list[tuple[FlowKey, SpliceXlate]] = []
        for inh in inherited:
            preload += [(inh.client_key, inh.client_value), (inh.server_key, inh.server_value)]
        fp = FastPath.open(sorted(links), obj_path=obj_path, max_flows=max_flows, preload=preload)
        for f in stale:
            detach(f)
        if stale:
            log.warning("replaced %d fast path filter(s) left by a daemon that died", len(stale))
    except FastPathUnavailable as exc:
        if mode == "on":
            raise
        log.warning("fast path off, spliced flows stay in the daemon: %s", exc)
        for f in stale:  # nobody will adopt their splices: they must not flow on unseen
            detach(f)
        return None, str(exc)
    log.info("fast path on: tc ingress of %s", ", ".join(sorted(links.values())))
    return KernelFastPath(fp, links, inherited), "on"


def host_addresses() -> set[bytes]:
    """Every address configured in this namespace, packed."""
    out: set[bytes] = set()
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if addr is not None:
                out.add(ipaddress.ip_address(addr).packed)
    return out


def _inherit(
    stale: list[StaleFilter],
    links: dict[int, str],
    prefixes: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    offload: bool,
    tun_name: str,
) -> list[InheritedSplice]:
    """The adoptable splices in the maps of stale filters (one log line on what is not).

    A splice of two kernel connections the dead daemon took over
    (``splice_sockets``) is on the host's own addresses, and its entries
    send what they punt to that daemon's TUN; they are carried over
    pointing at this daemon's TUN instead (its ifindex is new when the
    device is).
    """
    if not prefixes:
        return []
    entries: dict[FlowKey, SpliceXlate] = {}
    for prog_id in sorted({f.prog_id for f in stale if f.prog_id is not None}):
        try:
            entries.update(read_flows_of(prog_id))
        except (OSError, ValueError) as exc:
            log.warning("cannot adopt the splices of a dead daemon's program %d: %s", prog_id, exc)
    if not entries:
        return []

    def ours(addr: bytes) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip.version == net.version and ip in net for net in prefixes)

    try:
        host = host_addresses()
        tun_index = socket.if_nametoindex(tun_name)
    except Exception as exc:  # netlink errors too: the others are still adopted
        log.warning("kernel-socket splices cannot be adopted: %s", exc)
        host, tun_index = set(), 0
    splices, left_out = adoptable(
        entries.items(), ours=ours, links=set(links), offload=offload, host=host.__contains__
    )
    for inh in splices:
        if inh.client_value.punt_ifindex:
            inh.client_value.punt_ifindex = inh.server_value.punt_ifindex = tun_index
    log.warning(
        "adopting %d splice(s) a dead daemon left in the kernel; %d map entr%s left out"
        " (their segments get a RST)",
        len(splices),
        left_out,
        "y" if left_out == 1 else "ies",
    )
    return splices
