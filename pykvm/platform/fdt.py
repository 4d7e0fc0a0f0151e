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
           "UART_BASE", "UART_SIZE", "UART_CLOCK", "AiaNodes", "VirtioMmioNode",
           "IRQ_S_EXT", "IRQ_TYPE_LEVEL_HIGH", "VIRTIO_MMIO_BASE", "VIRTIO_MMIO_STRIDE",
           "VIRTIO_MMIO_IRQ", "VIRTIO_MMIO_MAX"]

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


# QEMU virt's virtio-mmio slots (hw/riscv/virt.c: VIRT_VIRTIO at 0x10001000, one 4 KiB page
# each, VIRTIO_IRQ 1 + i on the interrupt controller, VIRTIO_COUNT 8)
VIRTIO_MMIO_BASE = 0x10001000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_IRQ = 1
VIRTIO_MMIO_MAX = 8

IRQ_S_EXT = 9                    # the supervisor external interrupt, on each hart's cpu-intc
IRQ_TYPE_LEVEL_HIGH = 4          # interrupt specifier flags (dt-bindings/interrupt-controller/irq.h)


class AiaNodes(Record):
    """The AIA interrupt controllers to describe, as QEMU virt writes them under KVM: the
    S-level IMSIC files (``riscv,imsics`` at ``imsic_base``, one ``imsic_stride``-byte block
    per hart, ``num_ids`` MSI identities, guest index bits when there are guest files) and
    the APLIC (``riscv,aplic`` at ``aplic_base``, ``aplic_size`` bytes, ``num_sources``
    wired sources, delivering as MSIs to that IMSIC: ``msi-parent``)."""

    imsic_base: int
    imsic_stride: int
    num_ids: int
    aplic_base: int
    aplic_size: int
    num_sources: int
    guest_index_bits: int = 0


class VirtioMmioNode(Record):
    """One ``virtio,mmio`` node: ``base`` and ``size`` (bytes) of its window and ``irq``, its
    APLIC source (level-triggered)."""

    base: int
    size: int
    irq: int


def build_dtb(harts: Sequence[dict], mem_base: int, mem_size: int,
              timebase_frequency: int, bootargs: str = "", *,
              model: str = "pykvm,riscv-virt", boot_hartid: int | None = None,
              uart_base: int | None = None, uart_clock: int = UART_CLOCK,
              initrd: tuple[int, int] | None = None, aia: AiaNodes | None = None,
              virtio_mmio: Sequence[VirtioMmioNode] = ()) -> bytes:
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

    ``aia``: add ``/soc/interrupt-controller@<imsic>`` (compatible "riscv,imsics",
    ``interrupts-extended`` = each hart's cpu-intc phandle with :data:`IRQ_S_EXT`, in hart
    order) and ``/soc/interrupt-controller@<aplic>`` (compatible "riscv,aplic", ``msi-parent``
    = the IMSIC's phandle, two interrupt cells: source and flags) as :class:`AiaNodes` says.
    ``virtio_mmio``: ``/soc/virtio_mmio@<base>`` nodes (compatible "virtio,mmio", ``reg``,
    ``interrupts`` = <irq :data:`IRQ_TYPE_LEVEL_HIGH`>, ``interrupt-parent`` = the APLIC), in
    the order given (Linux probes them in that order: the first disk is vda); they need
    ``aia``. Phandles: the harts' cpu-intc nodes 1..n in hart order, then the IMSIC, then the
    APLIC. Raises ValueError for virtio-mmio nodes without ``aia``, overlapping windows, or a
    source outside the APLIC's.
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

    virtio_mmio = list(virtio_mmio)
    if virtio_mmio and aia is None:
        raise ValueError("virtio-mmio nodes need an interrupt controller (aia)")
    if uart_base is not None or aia is not None or virtio_mmio:
        soc = root.child("soc")
        soc.set("#address-cells", 2).set("#size-cells", 2)
        soc.set("compatible", "simple-bus")
        soc.set("ranges", EMPTY)
    if uart_base is not None:
        uart = soc.child(f"serial@{uart_base:x}")
        uart.set("compatible", "ns16550a")
        uart.set("reg", cells64(uart_base, UART_SIZE))
        uart.set("clock-frequency", uart_clock)
    if aia is not None:
        intc_phandles = list(range(1, phandle))          # the harts' cpu-intc, in hart order
        imsic_phandle, aplic_phandle = phandle, phandle + 1
        phandle += 2
        imsic = soc.child(f"interrupt-controller@{aia.imsic_base:x}")
        imsic.set("compatible", "riscv,imsics")
        imsic.set("#interrupt-cells", 0)
        imsic.set("interrupt-controller", EMPTY)
        imsic.set("msi-controller", EMPTY)
        imsic.set("#msi-cells", 0)
        imsic.set("interrupts-extended", [c for p in intc_phandles for c in (p, IRQ_S_EXT)])
        imsic.set("reg", cells64(aia.imsic_base, aia.imsic_stride * len(intc_phandles)))
        imsic.set("riscv,num-ids", aia.num_ids)
        if aia.guest_index_bits:
            imsic.set("riscv,guest-index-bits", aia.guest_index_bits)
        imsic.set("phandle", imsic_phandle)
        aplic = soc.child(f"interrupt-controller@{aia.aplic_base:x}")
        aplic.set("compatible", "riscv,aplic")
        aplic.set("#address-cells", 0)
        aplic.set("#interrupt-cells", 2)
        aplic.set("interrupt-controller", EMPTY)
        aplic.set("msi-parent", imsic_phandle)
        aplic.set("reg", cells64(aia.aplic_base, aia.aplic_size))
        aplic.set("riscv,num-sources", aia.num_sources)
        aplic.set("phandle", aplic_phandle)
        windows: list[tuple[int, int]] = []
        for dev in virtio_mmio:
            if not 1 <= dev.irq <= aia.num_sources:
                raise ValueError(f"virtio-mmio@{dev.base:x}: source {dev.irq} is not one of "
                                 f"the APLIC's 1..{aia.num_sources}")
            for b, e in windows:
                if dev.base < e and b < dev.base + dev.size:
                    raise ValueError(f"virtio-mmio@{dev.base:x} overlaps the window at {b:#x}")
            windows.append((dev.base, dev.base + dev.size))
            node = soc.child(f"virtio_mmio@{dev.base:x}")
            node.set("compatible", "virtio,mmio")
            node.set("reg", cells64(dev.base, dev.size))
            node.set("interrupt-parent", aplic_phandle)
            node.set("interrupts", [dev.irq, IRQ_TYPE_LEVEL_HIGH])

    boot = boot_hartid if boot_hartid is not None else int(harts[0]["hartid"])
    return to_dtb(root, boot_cpuid=boot)
