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
from pathlib import Path
from typing import Any, Literal

from pyroute2 import IPRoute

from daemon.fastpath import DEFAULT_OBJECT, FastPath, FastPathUnavailable
from daemon.fastpath.loader import detach_stale
from daemon.splice.translator import Translator

log = logging.getLogger("daemon.fastpath")

FastPathMode = Literal["auto", "on", "off"]
_ARPHRD_ETHER = 1
RelayKey = tuple[bytes, int, bytes, int]


class KernelFastPath:
    """A loaded and attached FastPath plus the egress lookup (the splicer's FastPathPort)."""

    def __init__(self, fp: FastPath, links: dict[int, str]) -> None:
        self.fp = fp
        self.links = links
        self._ipr = IPRoute()
        self._egress: dict[bytes, int | None] = {}

    def install(
        self,
        key: RelayKey,
        t: Translator,
        egress_ifindex: int,
        limit: int | None = None,
        fin_ack: int | None = None,
    ) -> None:
        self.fp.install(key, t, egress_ifindex, limit, fin_ack)

    def watch_fin_ack(self, key: RelayKey, fin_ack: int | None) -> None:
        self.fp.watch_fin_ack(key, fin_ack)

    def remove(self, key: RelayKey) -> tuple[int, int]:
        return self.fp.remove(key)

    def counters(self, key: RelayKey) -> tuple[int, int]:
        return self.fp.counters(key)

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

    def close(self) -> None:
        self.fp.close()
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
    mode: FastPathMode, tun_name: str, obj_path: Path = DEFAULT_OBJECT, max_flows: int = 131072
) -> tuple[KernelFastPath | None, str]:
    """Load and attach the program as ``mode`` says; (None, reason) when it does not run.

    Raises FastPathUnavailable only in mode "on".
    """
    if mode == "off":
        return None, "off (--fastpath off)"
    try:
        links = external_links(tun_name)
        if not links:
            raise FastPathUnavailable("no Ethernet link in this namespace to attach to")
        stale = 0
        for ifindex in links:
            try:
                stale += detach_stale(ifindex)
            except Exception as exc:  # a dump that fails must not keep the daemon down
                log.warning("could not look for a stale fast path on %s: %s", links[ifindex], exc)
        if stale:
            log.warning("removed %d fast path filter(s) left by a daemon that died", stale)
        fp = FastPath.open(sorted(links), obj_path=obj_path, max_flows=max_flows)
    except FastPathUnavailable as exc:
        if mode == "on":
            raise
        log.warning("fast path off, spliced flows stay in the daemon: %s", exc)
        return None, str(exc)
    log.info("fast path on: tc ingress of %s", ", ".join(sorted(links.values())))
    return KernelFastPath(fp, links), "on"
