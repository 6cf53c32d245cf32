"""A thin ctypes binding to libbpf.so.1: only what the fast path's loader calls.

Why ctypes and libbpf rather than iproute2's ``tc ... bpf obj``: tc pins
maps in ``ip netns exec``'s private bpffs, invisible to the daemon (DESIGN.md,
"The kernel fast path", pitfalls); libbpf gives the daemon the map fds
directly.  Debian ships libbpf1, so nothing is compiled at run time.

The option structs are mirrored from libbpf 1.1's libbpf.h and bpf.h field
for field (each begins with ``sz``, libbpf's guard against a caller built
against another version; ``size_t :0`` at their end pads to 8 bytes);
tests/test_fastpath_layout.py checks them against the installed headers.
libbpf 1.x reports errors as negative errno return values (int functions)
or NULL with errno set (pointer functions).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BPF_TC_EGRESS",
    "BPF_TC_INGRESS",
    "LibbpfMissing",
    "MapInfo",
    "ProgInfo",
    "SkbContext",
    "TcHook",
    "TcOpts",
    "TestRunOpts",
    "errno_of",
    "lib",
    "strerror",
]

log = logging.getLogger("daemon.fastpath")

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2

_c = ctypes
_vp = ctypes.c_void_p


class LibbpfMissing(OSError):
    """libbpf.so.1 could not be loaded."""


class TcHook(ctypes.Structure):
    """``struct bpf_tc_hook`` (libbpf 1.1)."""

    _fields_ = [
        ("sz", _c.c_size_t),
        ("ifindex", _c.c_int),
        ("attach_point", _c.c_int),  # enum bpf_tc_attach_point
        ("parent", _c.c_uint32),
        ("_tail", _c.c_uint32),  # size_t :0
    ]


class TcOpts(ctypes.Structure):
    """``struct bpf_tc_opts`` (libbpf 1.1)."""

    _fields_ = [
        ("sz", _c.c_size_t),
        ("prog_fd", _c.c_int),
        ("flags", _c.c_uint32),
        ("prog_id", _c.c_uint32),
        ("handle", _c.c_uint32),
        ("priority", _c.c_uint32),
        ("_tail", _c.c_uint32),  # size_t :0
    ]


class TestRunOpts(ctypes.Structure):
    """``struct bpf_test_run_opts`` (libbpf 1.1)."""

    __test__ = False  # not a pytest class, whatever its name says
    _fields_ = [
        ("sz", _c.c_size_t),
        ("data_in", _vp),
        ("data_out", _vp),
        ("data_size_in", _c.c_uint32),
        ("data_size_out", _c.c_uint32),
        ("ctx_in", _vp),
        ("ctx_out", _vp),
        ("ctx_size_in", _c.c_uint32),
        ("ctx_size_out", _c.c_uint32),
        ("retval", _c.c_uint32),
        ("repeat", _c.c_int),
        ("duration", _c.c_uint32),
        ("flags", _c.c_uint32),
        ("cpu", _c.c_uint32),
        ("batch_size", _c.c_uint32),
    ]


class SkbContext(ctypes.Structure):
    """``struct __sk_buff`` up to ``gso_size``: the ctx BPF_PROG_TEST_RUN accepts.

    The kernel takes a prefix of the struct and zero-fills the rest; it
    rejects non-zero fields it does not let a test set, so only ``gso_size``
    is ever written.
    """

    _fields_ = [
        ("_head", _c.c_uint32 * 36),  # len .. data_meta
        ("flow_keys", _c.c_uint64),
        ("tstamp", _c.c_uint64),
        ("wire_len", _c.c_uint32),
        ("gso_segs", _c.c_uint32),
        ("sk", _c.c_uint64),
        ("gso_size", _c.c_uint32),
        ("_tail", _c.c_uint32),
    ]


class ProgInfo(ctypes.Structure):
    """``struct bpf_prog_info`` up to ``name``: what finding a program's maps needs.

    BPF_OBJ_GET_INFO_BY_FD takes a prefix of the struct (``info_len``) and
    fills that much; ``map_ids`` points at ``nr_map_ids`` u32s for the
    kernel to fill, and comes back with how many the program uses.
    """

    _fields_ = [
        ("type", _c.c_uint32),
        ("id", _c.c_uint32),
        ("tag", _c.c_uint8 * 8),
        ("jited_prog_len", _c.c_uint32),
        ("xlated_prog_len", _c.c_uint32),
        ("jited_prog_insns", _c.c_uint64),
        ("xlated_prog_insns", _c.c_uint64),
        ("load_time", _c.c_uint64),
        ("created_by_uid", _c.c_uint32),
        ("nr_map_ids", _c.c_uint32),
        ("map_ids", _c.c_uint64),
        ("name", _c.c_char * 16),
    ]


class MapInfo(ctypes.Structure):
    """``struct bpf_map_info`` up to ``name``."""

    _fields_ = [
        ("type", _c.c_uint32),
        ("id", _c.c_uint32),
        ("key_size", _c.c_uint32),
        ("value_size", _c.c_uint32),
        ("max_entries", _c.c_uint32),
        ("map_flags", _c.c_uint32),
        ("name", _c.c_char * 16),
    ]


# libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *, va_list).
# A va_list parameter arrives as a pointer on x86-64 and arm64 alike.
_PRINT_FN = ctypes.CFUNCTYPE(_c.c_int, _c.c_int, _c.c_char_p, _vp)
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2


class _Lib:
    """The loaded library with typed functions; one per process (``lib()``)."""

    def __init__(self) -> None:
        try:
            so = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as e:
            raise LibbpfMissing(f"libbpf.so.1 not found (install libbpf1): {e}") from e
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [_c.c_char_p, _c.c_size_t, _c.c_char_p, _vp]
        self._vsnprintf.restype = _c.c_int

        def fn(name: str, restype: object, *argtypes: object) -> Any:
            f = getattr(so, name)
            f.restype = restype
            f.argtypes = list(argtypes)
            return f

        p, i, u32, u64 = _vp, _c.c_int, _c.c_uint32, _c.c_uint64
        self.object_open_file = fn("bpf_object__open_file", p, _c.c_char_p, p)
        self.object_load = fn("bpf_object__load", i, p)
        self.object_close = fn("bpf_object__close", None, p)
        self.find_program_by_name = fn("bpf_object__find_program_by_name", p, p, _c.c_char_p)
        self.program_fd = fn("bpf_program__fd", i, p)
        self.find_map_by_name = fn("bpf_object__find_map_by_name", p, p, _c.c_char_p)
        self.map_fd = fn("bpf_map__fd", i, p)
        self.map_set_max_entries = fn("bpf_map__set_max_entries", i, p, u32)
        self.map_update_elem = fn("bpf_map_update_elem", i, i, p, p, u64)
        self.map_lookup_elem = fn("bpf_map_lookup_elem", i, i, p, p)
        self.map_lookup_and_delete_elem = fn("bpf_map_lookup_and_delete_elem", i, i, p, p)
        self.map_delete_elem = fn("bpf_map_delete_elem", i, i, p)
        self.prog_test_run_opts = fn("bpf_prog_test_run_opts", i, i, p)
        self.tc_hook_create = fn("bpf_tc_hook_create", i, p)
        self.tc_hook_destroy = fn("bpf_tc_hook_destroy", i, p)
        self.tc_attach = fn("bpf_tc_attach", i, p, p)
        self.tc_detach = fn("bpf_tc_detach", i, p, p)
        self.num_possible_cpus = fn("libbpf_num_possible_cpus", i)
        self.map_get_next_key = fn("bpf_map_get_next_key", i, i, p, p)
        self.prog_get_fd_by_id = fn("bpf_prog_get_fd_by_id", i, u32)
        self.map_get_fd_by_id = fn("bpf_map_get_fd_by_id", i, u32)
        self.obj_get_info_by_fd = fn("bpf_obj_get_info_by_fd", i, i, p, _c.POINTER(u32))
        set_print = fn("libbpf_set_print", _PRINT_FN, _PRINT_FN)

        # libbpf prints to stderr by default, the verifier log included; route
        # it into logging, and into a capture buffer while a load runs so the
        # reason can go into FastPathUnavailable.  The callback object must
        # outlive every call libbpf makes through it: keep it on self.
        self._capture: collections.deque[str] | None = None
        self._capture_lock = threading.Lock()
        self._print_cb = _PRINT_FN(self._on_print)
        set_print(self._print_cb)

    def _on_print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        if fmt is None:
            return 0
        buf = ctypes.create_string_buffer(4096)
        n: int = self._vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip("\n")
        capture = self._capture
        if capture is not None:
            capture.extend(text.splitlines())
        if level == _LIBBPF_WARN:
            log.debug("libbpf: %s", text)
        return max(n, 0)

    @contextmanager
    def capture_log(self, lines: int = 200) -> Iterator[collections.deque[str]]:
        """Collect libbpf's messages (the verifier log on a failed load) while inside."""
        with self._capture_lock:
            self._capture = collections.deque(maxlen=lines)
            try:
                yield self._capture
            finally:
                self._capture = None


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def lib() -> _Lib:
    """The process's libbpf binding, loaded on first use; raises ``LibbpfMissing``."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


def errno_of(ret: int) -> int:
    """The errno of a failed libbpf call: its negative return value, else errno."""
    return -ret if ret < 0 else int(ctypes.get_errno())


def strerror(ret: int) -> str:
    return os.strerror(errno_of(ret))
