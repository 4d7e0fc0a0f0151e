"""A small flattened-devicetree (DTB, version 17) writer and the RISC-V
devicetree pykvm hands its guests.

Format facts (Devicetree Specification v0.4, "Flattened Devicetree Format"):
a 40-byte big-endian header, the memory reservation block (pairs of u64,
ended by a zero pair, 8-byte aligned), the structure block (tokens
BEGIN_NODE=1, END_NODE=2, PROP=3, NOP=4, END=9; everything 4-byte aligned)
and the strings block (NUL-terminated property names).
"""

from __future__ import annotations

import struct

from .._record import field, Record
from ..arch.riscv.extensions import parse_isa_string

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Sequence, Union

__all__ = ["FDT_MAGIC", "Node", "U64", "cells64", "to_dtb", "build_dtb", "mmu_type_name",
           "UART_BASE", "UART_SIZE", "UART_CLOCK"]

FDT_MAGIC = 0xD00DFEED
FDT_BEGIN_NODE = 1
FDT_END_NODE = 2
FDT_PROP = 3
FDT_NOP = 4
FDT_END = 9
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
_HEADER_SIZE = 40


class U64(int):
    """An int property to be encoded as one 64-bit value (two cells)."""


class Empty:
    """A property with no value (e.g. ``interrupt-controller;``)."""


EMPTY = Empty()

if TYPE_CHECKING:
    PropValue = Union[str, Sequence[str], int, Sequence[int], bytes, Empty]


class Node(Record):
    """A devicetree node; properties keep their insertion order."""

    name: str
    props: dict[str, PropValue] = field(default_factory=dict)
    children: list["Node"] = field(default_factory=list)

    def child(self, name: str, **props) -> "Node":
        """Append and return a child node called ``name`` with ``props``."""
        node = Node(name, dict(props))
        self.children.append(node)
        return node

    def set(self, name: str, value: PropValue) -> "Node":
        """Set property ``name`` to ``value``; returns the node, so calls chain."""
        self.props[name] = value
        return self


def cells64(*values: int) -> list[int]:
    """Split 64-bit values into big-endian 32-bit cell pairs (hi, lo)."""
    out: list[int] = []
    for v in values:
        out += [(v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF]
    return out


def _encode_value(name: str, value: PropValue) -> bytes:
    if isinstance(value, Empty):
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return _cstr(value, name)
    if isinstance(value, U64):
        return struct.pack(">Q", int(value) & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, int):
        return _cell(value, name)
    items = list(value)
    if items and all(isinstance(v, str) for v in items):
        return b"".join(_cstr(v, name) for v in items)
    if all(isinstance(v, int) for v in items):
        return b"".join(struct.pack(">Q", int(v)) if isinstance(v, U64) else _cell(v, name)
                        for v in items)
    raise TypeError(f"property {name!r}: cannot encode {value!r}")


def _cell(v: int, name: str) -> bytes:
    if not 0 <= v <= 0xFFFFFFFF:
        raise ValueError(f"property {name!r}: {v:#x} does not fit a 32-bit cell "
                         "(use U64 or cells64)")
    return struct.pack(">I", v)


def _cstr(s: str, name: str) -> bytes:
    b = s.encode("utf-8")
    if b"\0" in b:
        raise ValueError(f"property {name!r}: string contains NUL")
    return b + b"\0"


def _pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def to_dtb(root: Node, *, boot_cpuid: int = 0,
           reserve: Iterable[tuple[int, int]] = ()) -> bytes:
    """Serialise a tree (``root.name`` is ignored: the root's name is empty)."""
    strings = bytearray()
    offsets: dict[str, int] = {}

    def name_off(name: str) -> int:
        if name not in offsets:
            offsets[name] = len(strings)
            strings.extend(name.encode("ascii") + b"\0")
        return offsets[name]

    body = bytearray()

    def emit(node: Node, is_root: bool) -> None:
        body.extend(struct.pack(">I", FDT_BEGIN_NODE))
        body.extend(_pad4(("" if is_root else node.name).encode("ascii") + b"\0"))
        for pname, pval in node.props.items():
            data = _encode_value(pname, pval)
            body.extend(struct.pack(">III", FDT_PROP, len(data), name_off(pname)))
            body.extend(_pad4(data))
        for ch in node.children:
            emit(ch, False)
        body.extend(struct.pack(">I", FDT_END_NODE))

    emit(root, True)
    body.extend(struct.pack(">I", FDT_END))

    rsv = bytearray()
    for addr, size in reserve:
        rsv.extend(struct.pack(">QQ", addr, size))
    rsv.extend(struct.pack(">QQ", 0, 0))

    off_rsv = _HEADER_SIZE + (-_HEADER_SIZE % 8)      # 40 is already 8-aligned
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(body)
    total = off_strings + len(strings)
    total += -total % 8
    header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv,
                         FDT_VERSION, FDT_LAST_COMP_VERSION, boot_cpuid,
                         len(strings), len(body))
    blob = bytearray(header)
    blob.extend(b"\0" * (off_rsv - len(blob)))
    blob.extend(rsv)
    blob.extend(body)
    blob.extend(strings)
    blob.extend(b"\0" * (total - len(blob)))
    return bytes(blob)


_MMU = {8: "riscv,sv39", 9: "riscv,sv48", 10: "riscv,sv57"}


def mmu_type_name(mmu: int | str | None) -> str | None:
    """satp mode (8/9/10/0) or a ready ``riscv,svNN`` string -> ``mmu-type``."""
    if mmu is None or mmu == 0 or mmu == "":
        return None
    if isinstance(mmu, str):
        if mmu in ("sv39", "sv48", "sv57"):
            return "riscv," + mmu
        return mmu
    if mmu not in _MMU:
        raise ValueError(f"unknown satp mode {mmu}")
    return _MMU[mmu]


# The ns16550a UART of QEMU's RISC-V ``virt`` machine: where its guests (and their early
# consoles, e.g. kvm-unit-tests' CONFIG_UART_EARLY_BASE) look first.
UART_BASE = 0x10000000
UART_SIZE = 0x100
UART_CLOCK = 3686400             # Hz, QEMU's value for this UART


def build_dtb(harts: Sequence[dict], mem_base: int, mem_size: int,
              timebase_frequency: int, bootargs: str = "", *,
              model: str = "pykvm,riscv-virt", boot_hartid: int | None = None,
              uart_base: int | None = None, uart_clock: int = UART_CLOCK,
              initrd: tuple[int, int] | None = None) -> bytes:
    """The devicetree for a pykvm RISC-V guest.

    ``harts``: dicts with ``hartid``, ``isa`` (a ``riscv,isa`` string) and
    ``mmu_type`` (satp mode 8/9/10, 0 or None for none, or ``"riscv,sv48"``).
    Produces ``/cpus`` (timebase-frequency, ``cpu@N`` with device_type,
    reg, status, compatible "riscv", riscv,isa, riscv,isa-base,
    riscv,isa-extensions, mmu-type and an ``interrupt-controller`` child),
    ``/memory@<base>`` and ``/chosen`` (bootargs).

    ``uart_base``: add an ns16550a UART there as QEMU ``virt`` does
    (``/soc/serial@<base>``: compatible "ns16550a", reg of :data:`UART_SIZE`
    bytes, clock-frequency; no interrupts: drivers poll it) and point
    ``/chosen/stdout-path`` at it. ``initrd``: (start, end) guest-physical
    addresses, written as ``/chosen/linux,initrd-start`` and ``-end``.
    """
    if not harts:
        raise ValueError("at least one hart is needed")
    root = Node("")
    root.set("#address-cells", 2).set("#size-cells", 2)
    root.set("compatible", model).set("model", model)

    chosen = root.child("chosen")
    chosen.set("bootargs", bootargs)
    if initrd is not None:
        start, end = initrd
        if not 0 <= start <= end:
            raise ValueError(f"bad initrd range [{start:#x}, {end:#x})")
        chosen.set("linux,initrd-start", U64(start))
        chosen.set("linux,initrd-end", U64(end))
    if uart_base is not None:
        chosen.set("stdout-path", f"/soc/serial@{uart_base:x}")

    cpus = root.child("cpus")
    cpus.set("#address-cells", 1).set("#size-cells", 0)
    if timebase_frequency > 0xFFFFFFFF:
        cpus.set("timebase-frequency", U64(timebase_frequency))
    else:
        cpus.set("timebase-frequency", timebase_frequency)
    phandle = 1
    seen = set()
    for hart in harts:
        hid = int(hart["hartid"])
        if hid in seen:
            raise ValueError(f"duplicate hart id {hid}")
        seen.add(hid)
        isa = hart.get("isa") or "rv64imafdc"
        cpu = cpus.child(f"cpu@{hid:x}")
        cpu.set("device_type", "cpu")
        cpu.set("reg", hid)
        cpu.set("status", "okay")
        cpu.set("compatible", "riscv")
        cpu.set("riscv,isa", isa)
        base = "rv32i" if isa.lower().startswith("rv32") else "rv64i"
        cpu.set("riscv,isa-base", base)
        cpu.set("riscv,isa-extensions", parse_isa_string(isa))
        mmu = mmu_type_name(hart.get("mmu_type", hart.get("satp_mode")))
        if mmu:
            cpu.set("mmu-type", mmu)
        exts = set(cpu.props["riscv,isa-extensions"])
        for cbo in ("cbom", "cboz", "cbop"):     # riscv,cbom-block-size ... (riscv/cpus.yaml)
            if hart.get(f"{cbo}_block_size") and f"zi{cbo}" in exts:
                cpu.set(f"riscv,{cbo}-block-size", int(hart[f"{cbo}_block_size"]))
        intc = cpu.child("interrupt-controller")
        intc.set("#address-cells", 0)
        intc.set("#interrupt-cells", 1)
        intc.set("interrupt-controller", EMPTY)
        intc.set("compatible", "riscv,cpu-intc")
        intc.set("phandle", phandle)
        phandle += 1

    mem = root.child(f"memory@{mem_base:x}")
    mem.set("device_type", "memory")
    mem.set("reg", cells64(mem_base, mem_size))

    if uart_base is not None:
        soc = root.child("soc")
        soc.set("#address-cells", 2).set("#size-cells", 2)
        soc.set("compatible", "simple-bus")
        soc.set("ranges", EMPTY)
        uart = soc.child(f"serial@{uart_base:x}")
        uart.set("compatible", "ns16550a")
        uart.set("reg", cells64(uart_base, UART_SIZE))
        uart.set("clock-frequency", uart_clock)

    boot = boot_hartid if boot_hartid is not None else int(harts[0]["hartid"])
    return to_dtb(root, boot_cpuid=boot)
