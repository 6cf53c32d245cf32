"""Cost of the wire layer on this machine: per-segment parse and build, checksum throughput.

Run from the repo root: .venv/bin/python -m bench.bench_wire
Numbers are the best of five timeit repeats, so they show the code's cost
rather than the noise of a shared 2-vCPU machine.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from functools import partial

from daemon.wire.checksum import (
    internet_checksum,
    update_checksum32,
    update_partial_checksum_bytes,
)
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.tcp import ACK, TcpOptions, TcpSegment, build_ipv4_tcp, emit_tcp, parse_tcp

SRC = bytes([192, 0, 2, 1])
DST = bytes([198, 51, 100, 1])


def best_ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


def segment_cases(payload_len: int) -> list[tuple[str, Callable[[], object]]]:
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, TcpOptions(timestamp=(6, 7)), bytes(payload_len))
    pkt = bytes(build_ipv4_tcp(seg, SRC, DST))
    tcp = memoryview(pkt)[20:]
    return [
        ("Ipv4Packet view", partial(Ipv4Packet, pkt)),
        ("parse_tcp, no checksum", partial(parse_tcp, tcp, SRC, DST, verify_checksum=False)),
        ("parse_tcp, verify checksum", partial(parse_tcp, tcp, SRC, DST, verify_checksum=True)),
        ("emit_tcp, partial checksum", partial(emit_tcp, seg, SRC, DST, partial_checksum=True)),
        ("emit_tcp, full checksum", partial(emit_tcp, seg, SRC, DST)),
        ("build_ipv4_tcp, full checksum", partial(build_ipv4_tcp, seg, SRC, DST)),
    ]


def main() -> None:
    for payload_len in (0, 1448, 65000):
        number = 20_000 if payload_len < 60000 else 2_000
        print(f"--- IPv4+TCP, TS option, {payload_len} B payload")
        for name, fn in segment_cases(payload_len):
            print(f"{name:32s} {best_ns(fn, number):9.0f} ns")

    print("--- checksum")
    for size in (1500, 65536):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        ns = best_ns(partial(internet_checksum, data), 20_000 if size < 60000 else 2_000)
        print(f"internet_checksum {size:6d} B       {ns:9.0f} ns  {size / ns:6.2f} GB/s")
    new = bytes([203, 0, 113, 5])
    for name, fn in [
        ("update_checksum32", partial(update_checksum32, 0x1234, 5, 6)),
        ("update_partial_checksum_bytes", partial(update_partial_checksum_bytes, 0x1234, SRC, new)),
    ]:
        print(f"{name:32s} {best_ns(fn, 200_000):9.0f} ns")


if __name__ == "__main__":
    main()
