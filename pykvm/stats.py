"""Decode a KVM binary stats file descriptor (KVM_GET_STATS_FD) into a dict."""
from __future__ import annotations

import os
import struct

from . import abi
from .abi import ffi

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict

_HDR = ffi.sizeof("struct kvm_stats_header")
_DESC = ffi.sizeof("struct kvm_stats_desc")


def read_stats(fd: int) -> Dict[str, object]:
    """{name: value}; histogram stats give a list, scalars an int. Every offset and size read
    from the fd is checked against what was actually read."""
    hdr = os.pread(fd, _HDR, 0)
    if len(hdr) != _HDR:
        raise ValueError("short KVM stats header")
    flags, name_size, num_desc, id_off, desc_off, data_off = struct.unpack("<6I", hdr)
    dsize = _DESC + name_size
    descs = os.pread(fd, dsize * num_desc, desc_off)
    if len(descs) != dsize * num_desc:
        raise ValueError("short KVM stats descriptor table")
    entries = []
    data_len = 0
    for i in range(num_desc):
        d = descs[i * dsize:(i + 1) * dsize]
        dflags, exponent, size, offset, bucket = struct.unpack_from("<IhHII", d)
        name = d[_DESC:_DESC + name_size].split(b"\0", 1)[0].decode()
        entries.append((name, dflags, size, offset))
        data_len = max(data_len, offset + size * 8)
    data = os.pread(fd, data_len, data_off)
    out = {}
    for name, dflags, size, offset in entries:
        if offset + size * 8 > len(data):
            continue
        vals = struct.unpack_from(f"<{size}Q", data, offset)
        kind = (dflags & abi.STATS_TYPE_MASK) >> abi.STATS_TYPE_SHIFT
        hist = kind in (abi.STATS_TYPES["LINEAR_HIST"], abi.STATS_TYPES["LOG_HIST"])
        out[name] = list(vals) if hist or size > 1 else vals[0]
    return out
