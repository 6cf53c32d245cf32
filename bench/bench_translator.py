"""Per-packet cost of the splice translator (daemon/splice/translator.py) on this machine.

Run from the repo root: .venv/bin/python -m bench.bench_translator
Each case translates the same buffer over and over (the rewrite is in place
and idempotent in cost), best of five timeit repeats.  A 64 KB GSO packet
must cost the same as a 1448 B one: nothing here reads the payload, except
the plain-mode split, which copies it.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from functools import partial

from daemon.splice.translator import Translator, TsMode, peek, translate
from daemon.wire.tcp import ACK, PSH, TcpOptions, TcpSegment, build_ipv4_tcp
from daemon.wire.vnet import VnetHeader, vnet_header_for_tcp

CLIENT = bytes([192, 0, 2, 1])
DAEMON = bytes([192, 0, 2, 100])
DAEMON_OUT = bytes([198, 51, 100, 100])
SERVER = bytes([203, 0, 113, 2])


def best_ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def translator(offload: bool, ts_mode: TsMode = TsMode.MAP, wnd_in_shift: int = 0) -> Translator:
    return Translator(
        src_addr=DAEMON_OUT,
        dst_addr=SERVER,
        src_port=40000,
        dst_port=80,
        seq_delta=123456,
        ack_delta=-654321,
        ack_fixed=0,
        ts_mode=ts_mode,
        tsval_delta=1000,
        tsecr_delta=-1000,
        sack=True,
        wnd_in_shift=wnd_in_shift,
        wnd_out_shift=0,
        out_mss=1448,
        offload=offload,
    )


def case(
    t: Translator, payload_len: int, opts: TcpOptions, vnet: VnetHeader | None
) -> Callable[[], object]:
    seg = TcpSegment(1234, 8080, 1, 2, ACK | PSH, 500, opts, bytes(payload_len))
    buf = build_ipv4_tcp(seg, CLIENT, DAEMON, partial_checksum=t.offload)
    view = memoryview(buf)
    if t.ts_mode is not TsMode.STRIP:
        return partial(translate, t, vnet, view)
    # Stripping is not idempotent in cost (the second pass finds only NOPs):
    # put the option back first, which adds one 12-byte slice assignment.
    options = bytes(buf[40:52])

    def strip() -> object:
        view[40:52] = options
        return translate(t, vnet, view)

    return strip


def main() -> None:
    ts = TcpOptions(timestamp=(6, 7))
    ts_sack = TcpOptions(timestamp=(6, 7), sack_blocks=((100, 200), (300, 400), (500, 600)))
    off, plain = translator(True), translator(False)
    gso = vnet_header_for_tcp(20, 32, 65000, 1448)
    gso_sack = vnet_header_for_tcp(20, 60, 64972, 1448)
    csum = vnet_header_for_tcp(20, 32, 1448, 1448)
    cases = [
        ("offload  1448 B, TS", case(off, 1448, ts, csum)),
        ("offload 64 KB GSO, TS", case(off, 65000, ts, gso)),
        ("offload 64 KB GSO, TS+3 SACK", case(off, 64972, ts_sack, gso_sack)),
        ("offload 64 KB GSO, TS strip", case(translator(True, TsMode.STRIP), 65000, ts, gso)),
        ("offload 64 KB GSO, TS, wscale 7", case(translator(True, wnd_in_shift=7), 65000, ts, gso)),
        ("plain    1448 B, TS", case(plain, 1448, ts, None)),
        ("plain    1448 B, TS+3 SACK", case(plain, 1420, ts_sack, None)),
        ("plain    4000 B, TS (split in 3)", case(plain, 4000, ts, None)),
    ]
    for name, fn in cases:
        print(f"translate {name:34s} {best_ns(fn, 50_000):7.0f} ns")
    pkt = build_ipv4_tcp(TcpSegment(1, 2, 3, 4, ACK, 5, ts, bytes(1448)), CLIENT, DAEMON)
    print(f"peek      {'1448 B':34s} {best_ns(partial(peek, memoryview(pkt)), 200_000):7.0f} ns")


if __name__ == "__main__":
    main()
