"""The fast path's ctypes mirrors agree with the C headers, byte for byte.

daemon/fastpath/layout.py mirrors splice_map.h (the map the daemon and the
tc program share) and daemon/fastpath/libbpf.py mirrors libbpf's option
structs and the prefix of ``struct __sk_buff`` that BPF_PROG_TEST_RUN
takes.  A mismatch would not fail loudly: the kernel would read a shifted
field.  So a small C program, compiled with gcc against the real headers,
prints every size and offset and the ctypes side must agree.  No root.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.fastpath import layout, libbpf

HEADER_DIR = Path(layout.__file__).resolve().parent

# C struct -> (ctypes Structure, fields to compare: the C names).  Fields
# whose names start with "_" on the Python side are padding stand-ins (C's
# `size_t :0`, an unused head), checked through the total size only.
MIRRORS: dict[str, tuple[type[ctypes.Structure], bool]] = {
    "struct splice_key": (layout.SpliceKey, True),
    "struct splice_xlate": (layout.SpliceXlate, True),
    "struct splice_count": (layout.SpliceCount, True),
    "struct splice_stats": (layout.SpliceStats, True),
    "struct bpf_tc_hook": (libbpf.TcHook, True),
    "struct bpf_tc_opts": (libbpf.TcOpts, True),
    "struct bpf_test_run_opts": (libbpf.TestRunOpts, True),
    # Only a prefix of these is mirrored: offsets, not the size.
    "struct __sk_buff": (libbpf.SkbContext, False),
    "struct bpf_prog_info": (libbpf.ProgInfo, False),
    "struct bpf_map_info": (libbpf.MapInfo, False),
}


def _named_fields(struct: type[ctypes.Structure]) -> list[str]:
    return [f[0] for f in struct._fields_ if not f[0].startswith("_")]


def _printer_source() -> str:
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/bpf.h>",
        "#include <bpf/libbpf.h>",
        "#include <bpf/bpf.h>",
        '#include "splice_map.h"',
        "int main(void) {",
    ]
    for c_name, (struct, _) in MIRRORS.items():
        lines.append(f'  printf("{c_name}|sizeof|%zu|%zu\\n", sizeof({c_name}), sizeof({c_name}));')
        for name in _named_fields(struct):
            lines.append(
                f'  printf("{c_name}|{name}|%zu|%zu\\n", offsetof({c_name}, {name}),'
                f" sizeof((({c_name} *)0)->{name}));"
            )
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[int, int]]:
    """{(struct, field): (offset, size)} as gcc lays them out."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is missing: run `make sysdeps` (the layout check compiles splice_map.h)")
    work = tmp_path_factory.mktemp("layout")
    src = work / "layout.c"
    src.write_text(_printer_source())
    exe = work / "layout"
    build = subprocess.run(
        [gcc, "-Wall", "-I", str(HEADER_DIR), "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    table: dict[tuple[str, str], tuple[int, int]] = {}
    for line in out.splitlines():
        struct, field, offset, size = line.split("|")
        table[struct, field] = (int(offset), int(size))
    return table


@pytest.mark.parametrize("c_name", list(MIRRORS))
def test_ctypes_mirror_matches_the_c_layout(
    c_layout: dict[tuple[str, str], tuple[int, int]], c_name: str
) -> None:
    struct, whole = MIRRORS[c_name]
    for name in _named_fields(struct):
        descriptor = getattr(struct, name)
        assert (descriptor.offset, descriptor.size) == c_layout[c_name, name], name
    c_size = c_layout[c_name, "sizeof"][0]
    if whole:
        assert ctypes.sizeof(struct) == c_size
    else:
        assert ctypes.sizeof(struct) <= c_size


def test_the_map_value_has_no_hidden_padding() -> None:
    # Every byte is a named field or the explicit _pad: the daemon writes
    # whole values, so a hole would carry stale bytes into the kernel.
    # The key likewise: a hash map compares every byte of it.
    for struct, size in ((layout.SpliceXlate, 112), (layout.SpliceKey, 40)):
        covered = sum(ctypes.sizeof(f[1]) for f in struct._fields_)
        assert covered == ctypes.sizeof(struct) == size


@pytest.mark.parametrize(
    "key",
    [
        (bytes([192, 0, 2, 1]), 1234, bytes([198, 51, 100, 1]), 1080),
        (bytes.fromhex("20010db8000c00000000000000000001"), 80, bytes(15) + b"\1", 65535),
    ],
    ids=["IPv4", "IPv6"],
)
def test_a_key_encodes_and_decodes_in_its_family(key: layout.FlowKey) -> None:
    k = layout.encode_key(key)
    assert k.family == (4 if len(key[0]) == 4 else 6)
    assert bytes(k.saddr)[len(key[0]) :] == bytes(16 - len(key[0]))  # the rest zero
    assert layout.decode_key(k) == key


def test_a_key_of_two_families_or_an_odd_length_is_refused() -> None:
    with pytest.raises(ValueError, match="two families"):
        layout.encode_key((bytes(4), 1, bytes(16), 2))
    with pytest.raises(ValueError, match="5 bytes"):
        layout.encode_key((bytes(5), 1, bytes(5), 2))
