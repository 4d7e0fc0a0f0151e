"""Device cases of the device fuzzer, ``python -m pykvm.fuzz --devices`` (docs/fuzzing.md,
"Device mode"): their generation and the assembling of their guest code.

Each *device case* is a PC machine (:class:`pykvm.machine.Machine` with ``machine="pc"`` and a random
subset of the optional devices ``edu`` and ``intel-iommu``) running a small generated guest on
one to four vCPUs at once, in 64-bit long mode or 32-bit protected mode. Each vCPU executes its
own list of *operations*, each one a few x86 instructions that touch a device:

====== ================================================================================
op     what the vCPU does
====== ================================================================================
out    ``out dx, al/ax/eax`` of a value (widths 1, 2, 4) to a port
in     ``in al/ax/eax, dx``
outs   ``rep outs`` of ``count`` items from a RAM buffer to a port
ins    ``rep ins`` of ``count`` items from a port into a buffer (RAM or not)
w      a store of width 1, 2, 4 or 8 at any address and alignment (``mov [rbx], al/ax/eax/rax``;
       in 32-bit code the 8-byte store is an MMX ``movq``)
r      a load of width 1, 2, 4 or 8 (``mov al/ax/eax/rax, [rbx]``, MMX ``movq`` in 32-bit code)
movs   ``rep movs`` of ``count`` items between two addresses (RAM and MMIO)
rmw    load ``src``, AND a mask, OR a mask, store to ``dst`` (VT-d's GSTS -> GCMD)
pause  a delay loop (timers fire, other vCPUs interleave)
sti    interrupts on for a delay loop (the IDT's handlers send the LAPIC an EOI and return)
raw    instructions of :class:`pykvm.fuzz.generator.InstructionStream` aimed at the devices
====== ================================================================================

The operation lists come from *recipes* per device — fw_cfg (selector, data, DMA), PCI
configuration mechanism #1 (every width and offset, BAR sizing, the command register, the MSI
capability), VT-d (root/context tables, second-level page tables, the invalidation queue, IRTA
and IRTEs, fault status and recording registers, GCMD), edu (DMA, interrupts, MSI), the CMOS RTC
(every register, alarms that can never match, periodic rates), ACPI PM (PM1 event/control,
sleep types), pc-testdev, the 16550 (loopback included), port 0x92 and 0xCF9 resets — and plain
random accesses of every width to the device ranges and to random ports and addresses. The
tables, queues and DMA buffers the recipes use are written into guest RAM by the host before the
run, at addresses drawn from :func:`_Gen.addr`'s classes: inside RAM, beyond RAM, in an MMIO page
(VT-d's own registers, the LAPIC, the IOAPIC ...), at 2^64 - 4096 and crossing the end of RAM.

A case is a pure function of (seed, index, max_vcpus, deadline, modes) (:func:`generate_case`)
and is kept in its JSON form (:data:`CASE_FORMAT`) in reproducers; :func:`assemble` turns its
operations into the flat guest image. :func:`pykvm.fuzz.device_runner.run_case` runs one and
classifies it (see :data:`pykvm.fuzz.device_runner.CPU_PER_ACCESS_S` for the host-CPU bound).
"""
import random
import struct
from typing import List

from ..arch.x86 import layout as L
from .generator import InstructionStream, blobs_from_json, blobs_to_json, edge_value, le_bytes

CASE_FORMAT = "pykvm-fuzz-device-case/1"
MODES = ("protected", "long")
DEFAULT_DEADLINE = 0.2          # seconds each guest may run

# ---- guest-physical layout of a device case ---------------------------------------------------
CODE_BASE = L.IMAGE_BASE             # vCPU i's code at CODE_BASE + i * CODE_STRIDE
CODE_STRIDE = 0x10000
MAX_VCPUS = 4
IDT_ADDR = 0x5000                    # 256 gates (16 bytes in long mode, 8 in protected mode)
HANDLER_ADDR = 0x6000                # the exception and interrupt handlers
DONE_ADDR = 0x6800                   # APs count themselves done here (lock inc)
SCRATCH_ADDR = 0x6900                # 16 bytes per vCPU: the MMX operand of 8-byte accesses
WAKE_ADDR = 0x8000                   # the S3 waking vector's code (real or 32-bit mode)
DATA_BASE = 0x200000                 # buffers and tables in RAM: DATA_BASE .. + DATA_SIZE
DATA_SIZE = 0x400000
MIN_RAM = 16 << 20

EXC_VALUE = 0xEE                     # isa-debug-exit value of the exception handler
WAKE_VALUE = 0x5A                    # ... of the S3 waking code
DONE_VALUE = 0x31                    # ... of vCPU 0 at the end of its operations

# ---- the PC machine's devices (addresses and register offsets from their specifications) -------
VTD_BASE = 0xFED90000                # VT-d registers (Intel VT-d spec, 10.4)
VTD = {"VER": 0x00, "CAP": 0x08, "ECAP": 0x10, "GCMD": 0x18, "GSTS": 0x1C, "RTADDR": 0x20,
       "CCMD": 0x28, "FSTS": 0x34, "FECTL": 0x38, "FEDATA": 0x3C, "FEADDR": 0x40,
       "FEUADDR": 0x44, "AFLOG": 0x58, "PMEN": 0x64, "PLMBASE": 0x68, "PLMLIMIT": 0x6C,
       "PHMBASE": 0x70, "PHMLIMIT": 0x78, "IQH": 0x80, "IQT": 0x88, "IQA": 0x90, "ICS": 0x9C,
       "IECTL": 0xA0, "IEDATA": 0xA4, "IEADDR": 0xA8, "IEUADDR": 0xAC, "IRTA": 0xB8,
       "IVA": 0x200, "IOTLB": 0x208, "FRCD": 0x220}
GCMD_TE, GCMD_SRTP, GCMD_WBF, GCMD_QIE = 1 << 31, 1 << 30, 1 << 27, 1 << 26
GCMD_IRE, GCMD_SIRTP, GCMD_CFI = 1 << 25, 1 << 24, 1 << 23
GSTS_TO_GCMD = 0x96FFFFFF            # GSTS bits that stay commands (TE, QIE, IRE, CFI ...)
EDU_BAR = 0xFEA00000                 # QEMU docs/specs/edu.rst
EDU_BDF = 3 << 3                     # 00:03.0
EDU = {"ID": 0x00, "ALIVE": 0x04, "FACT": 0x08, "STATUS": 0x20, "ISR": 0x24, "RAISE": 0x60,
       "ACK": 0x64, "SRC": 0x80, "DST": 0x88, "CNT": 0x90, "CMD": 0x98, "BUF": 0x40000}
TESTDEV_IOMEM = 0xFF000000           # pc-testdev: 64 KiB of I/O memory
LAPIC, IOAPIC, HPET = 0xFEE00000, 0xFEC00000, 0xFED00000
MMIO_PAGES = (VTD_BASE, LAPIC, IOAPIC, HPET, EDU_BAR, TESTDEV_IOMEM, 0xFEE00000 + 0xB0,
              0xFFFFF000, 0xE0000000, 0xA0000)
FWCFG_SEL, FWCFG_DATA, FWCFG_DMA = 0x510, 0x511, 0x514
PCI_ADDR, PCI_DATA, PCI_RESET = 0xCF8, 0xCFC, 0xCF9
RTC_INDEX, RTC_DATA = 0x70, 0x71
PM_BASE = 0x600                      # PM1a_EVT (STS 0x600, EN 0x602), PM1a_CNT 0x604, PM_TMR 0x608
COM1 = 0x3F8
PORT92 = 0x92
TESTDEV_PORTS = (0xE0, 0xE1, 0xE2, 0xE3, 0xE4, 0xE8, 0xE9, 0xEA, 0xEB)
TESTDEV_IRQ = 0x2000
DEVICE_PORTS = ((0x70, 2), (0x510, 12), (0x600, 12), (0xCF8, 8), (0xE0, 12), (0x2000, 24),
                (0x3F8, 8), (0x92, 1), (0x60, 5), (0x20, 2), (0xA0, 2), (0x40, 4), (0x4D0, 2),
                (0x402, 1), (0x1000, 4), (0xB000, 64))
DEVICE_MMIO = ((VTD_BASE, 0x1000), (EDU_BAR, 0x100), (EDU_BAR + 0x40000, 0x1000),
               (TESTDEV_IOMEM, 0x10000), (LAPIC, 0x1000), (IOAPIC, 0x20), (HPET, 0x400))


# ================================================================================================
# Generation
# ================================================================================================

class _DevStream(InstructionStream):
    """:class:`~pykvm.fuzz.generator.InstructionStream` with its I/O templates aimed at the PC machine's devices."""

    def port(self) -> int:
        r = self.r
        if r.random() < 0.85:
            base, n = r.choice(DEVICE_PORTS)
            return base + r.randrange(n)
        return r.getrandbits(16)

    def mmio_addr(self) -> int:
        base, n = self.r.choice(DEVICE_MMIO)
        return base + self.r.randrange(n)

    def ram_addr(self) -> int:
        return DATA_BASE + self.r.randrange(DATA_SIZE - 0x1000)

    def t_io(self):
        """``in``/``out`` at an immediate or DX port, any width (no string forms: their counts
        are what the CPU bound counts)."""
        r = self.r
        size_pre = b"\x66" if r.random() < 0.3 else b""
        if r.random() < 0.35:
            self.emit(size_pre, r.choice((0xE4, 0xE5, 0xE6, 0xE7)), self.port() & 0xFF)
            return
        self.emit((b"\x66" if self.bits != 16 else b"") + b"\xBA" + le_bytes(self.port(), 2))
        self.emit(size_pre, r.choice((0xEC, 0xED, 0xEE, 0xEF)))

    NOISE = ("t_io", "t_mmio", "t_mov_imm", "t_moffs")


class _Gen:
    """The state of one case's generation: the RNG, the RAM layout and the blobs the host writes
    into guest RAM."""

    def __init__(self, rng: random.Random, *, ram: int, mode: str, devices):
        self.r = rng
        self.ram = ram
        self.below, self.above = L.ram_split(ram)
        self.mode = mode
        self.devices = set(devices)
        self.blobs: List[tuple] = []
        self.items = 0                    # items of string instructions (the CPU bound)
        self._next_data = DATA_BASE

    # -- values and addresses -------------------------------------------------------------
    def in_ram(self, addr: int, n: int) -> bool:
        if 0 <= addr and addr + n <= self.below:
            return True
        return self.above > 0 and L.HIGH_RAM_START <= addr and \
            addr + n <= L.HIGH_RAM_START + self.above

    def data(self, size: int, align: int = 0x1000) -> int:
        """A fresh, ``align``-aligned range of ``size`` bytes in the data area."""
        a = (self._next_data + align - 1) & ~(align - 1)
        if a + size > DATA_BASE + DATA_SIZE:
            a = DATA_BASE + (self.r.randrange(DATA_SIZE - size) & ~(align - 1))
        self._next_data = a + size
        return a

    def addr(self, size: int = 8, align: int = 1, *, ram_weight: float = 0.6) -> int:
        """A guest-physical address for a table, queue, status word or DMA buffer: mostly a
        fresh place in RAM, else beyond RAM, in an MMIO page, at 2^64 - 4096, crossing the end
        of RAM, 0, or random."""
        r = self.r
        if r.random() < ram_weight:
            return self.data(max(size, 1), max(align, 8))
        k = r.choice(("beyond", "beyond", "mmio", "mmio", "top", "cross", "cross", "zero",
                      "random", "low", "hole"))
        if k == "beyond":
            top = L.HIGH_RAM_START + self.above if self.above else self.below
            a = r.choice((top, top + 0x1000 * r.randrange(1, 64), self.below + 0x1000,
                          1 << 32, 1 << 39, 1 << 46, (1 << 52) - 0x1000))
        elif k == "mmio":
            a = r.choice(MMIO_PAGES) + r.choice((0, 0, 0x10, 0x80, 0xFF8))
        elif k == "top":
            a = r.choice(((1 << 64) - 0x1000, (1 << 64) - 16, (1 << 64) - 8, (1 << 64) - size,
                          (1 << 63)))
        elif k == "cross":
            end = self.below if not self.above or r.random() < 0.5 else \
                L.HIGH_RAM_START + self.above
            a = end - r.choice((4, 8, 16, 64, 0x1000 - 8, max(size // 2, 1)))
        elif k == "zero":
            a = 0
        elif k == "low":
            a = r.randrange(0, 0xA0000)
        elif k == "hole":
            a = r.randrange(self.below, 0x100000000) if self.below < 0x100000000 else 0xC0000000
        else:
            a = r.getrandbits(64)
        return a & ~(align - 1) & ((1 << 64) - 1)

    def put(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` before the run, where it is RAM (the bytes of a table
        that crosses the end of RAM that lie in RAM)."""
        n = len(data)
        if self.in_ram(addr, n):
            self.blobs.append((addr, bytes(data)))
            return
        for lo, hi in ((0, self.below), (L.HIGH_RAM_START, L.HIGH_RAM_START + self.above)):
            a, b = max(addr, lo), min(addr + n, hi)
            if a < b:
                self.blobs.append((a, bytes(data[a - addr:b - addr])))

    def value(self, size: int) -> int:
        return edge_value(self.r, size)

    def width(self, *, mmio: bool = True) -> int:
        if mmio and self.mode == "long":
            return self.r.choice((1, 2, 4, 4, 4, 8, 8))
        if mmio:
            return self.r.choice((1, 2, 4, 4, 4, 8))        # 8: MMX movq
        return self.r.choice((1, 2, 4, 4))

    def jitter(self) -> int:
        """An offset that misaligns an access now and then."""
        return 0 if self.r.random() < 0.8 else self.r.randrange(1, 8)

    # -- ops ----------------------------------------------------------------------------------
    def out(self, port, size, value):
        return ["out", port & 0xFFFF, size, value & ((1 << (8 * size)) - 1)]

    def mw(self, addr, size, value):
        return ["w", addr, size, value & ((1 << (8 * size)) - 1)]

    def reg_access(self, base: int, off: int, *, port: bool = False) -> list:
        """A read or a write of any width at ``base + off`` (+ a misalignment now and then)."""
        size = self.width(mmio=not port)
        where = base + off + self.jitter()
        if self.r.random() < 0.5:
            return ["in", where & 0xFFFF, size] if port else ["r", where, size]
        v = self.value(size)
        return self.out(where, size, v) if port else self.mw(where, size, v)

    def str_op(self, kind: str, port_or_dst: int, size: int, count: int, buf: int) -> list:
        self.items += count
        return [kind, port_or_dst, size, count, buf]

    def count(self) -> int:
        return self.r.choice((1, 2, 3, 7, 16, 64, 255, 1024 // 4, 4096))


# -- recipes: each returns a list of ops (and may add blobs) ------------------------------------

def _random_access(g: _Gen) -> list:
    r = g.r
    k = r.random()
    if k < 0.45:
        base, n = r.choice(DEVICE_PORTS)
        return [g.reg_access(base, r.randrange(n), port=True)]
    if k < 0.6:
        return [g.reg_access(r.getrandbits(16), 0, port=True)]
    if k < 0.85:
        base, n = r.choice(DEVICE_MMIO)
        return [g.reg_access(base, r.randrange(n) - (8 if r.random() < 0.05 else 0))]
    # random MMIO: the 32-bit hole, the last bytes of a device window, above RAM
    a = r.choice((r.randrange(g.below, 0x100000000) if g.below < 0x100000000 else 0xF0000000,
                  r.randrange(0xFE000000, 0x100000000), 0xFF00FFFC, 0xFED90FFC, 0xFFFFFFF8))
    return [g.reg_access(a, 0)]


def _fwcfg(g: _Gen) -> list:
    r = g.r
    ops = []
    key = r.choice((0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0F, 0x19, 0x20, 0x8000, 0x8001,
                    0x8002, 0x8003, 0x8004, 0x4000, 0xC000, 0x4003, 0xFFFF, r.getrandbits(16)))
    sel_size = r.choice((2, 2, 2, 1, 4))
    ops.append(g.out(FWCFG_SEL + (1 if r.random() < 0.05 else 0), sel_size, key))
    for _ in range(r.randint(1, 3)):
        k = r.random()
        if k < 0.5:
            ops += [["in", FWCFG_DATA, r.choice((1, 1, 2, 4))] for _ in range(r.randint(1, 12))]
        elif k < 0.7:
            ops.append(g.str_op("ins", FWCFG_DATA, 1, g.count(), g.addr(4096, 1, ram_weight=0.8)))
        elif k < 0.8:
            ops.append(g.out(FWCFG_DATA, r.choice((1, 2, 4)), g.value(4)))
        elif k < 0.85:
            ops.append(["in", FWCFG_SEL, r.choice((1, 2, 4))])
        else:
            # the DMA interface (QEMU docs/specs/fw_cfg.rst): a FWCfgDmaAccess (big-endian
            # control, length, address) whose address goes to 0x514 (high) and 0x518 (low)
            desc = g.addr(16, 8, ram_weight=0.8)
            control = r.choice((0x02, 0x04, 0x08, 0x10, 0x0A, 0x01, r.getrandbits(32))) | \
                (key << 16 if r.random() < 0.5 else 0)
            g.put(desc, struct.pack(">IIQ", control & 0xFFFFFFFF,
                                    r.choice((0, 1, 4, 8, 4096, 0xFFFFFFFF)), g.addr(64, 1)))
            ops.append(g.out(FWCFG_DMA, 4, int.from_bytes((desc >> 32).to_bytes(4, "big"), "little")))
            ops.append(g.out(FWCFG_DMA + 4, 4, int.from_bytes((desc & 0xFFFFFFFF).to_bytes(4, "big"),
                                                              "little")))
            ops.append(["r", desc, 4])
    return ops


def _cfg_addr(g: _Gen, dev: int, fn: int, reg: int) -> int:
    r = g.r
    bus = 0 if r.random() < 0.9 else r.randrange(256)
    en = 0x80000000 if r.random() < 0.92 else 0
    return en | bus << 16 | (dev & 31) << 11 | (fn & 7) << 8 | (reg & 0xFC) | \
        (r.randrange(4) if r.random() < 0.05 else 0)


def _pci(g: _Gen) -> list:
    r = g.r
    ops = []
    dev = r.choice((0, 1, 1, 3, 3, 2, r.randrange(32)))
    fn = 0 if dev != 1 else r.choice((0, 3, 1, 2))
    fn = fn if r.random() < 0.9 else r.randrange(8)
    for _ in range(r.randint(1, 6)):
        k = r.random()
        reg = r.choice((0, 4, 6, 8, 0xC, 0x10, 0x14, 0x2C, 0x30, 0x34, 0x3C, 0x40, 0x44, 0x48,
                        0x4C, 0x58, 0x80, 0xFC, r.randrange(256)))
        ops.append(g.out(PCI_ADDR, 4, _cfg_addr(g, dev, fn, reg)))
        if k < 0.4:
            size = r.choice((1, 2, 4))
            ops.append(["in", PCI_DATA + r.randrange(4), size])
        elif k < 0.75:
            size = r.choice((1, 2, 4))
            ops.append(g.out(PCI_DATA + r.randrange(4), size, g.value(size)))
        elif k < 0.9:                        # BAR sizing: all-ones, read back, restore
            bar = r.choice((0x10, 0x14, 0x18, 0x30))
            ops.append(g.out(PCI_ADDR, 4, _cfg_addr(g, dev, fn, bar)))
            ops += [g.out(PCI_DATA, 4, 0xFFFFFFFF), ["in", PCI_DATA, 4],
                    g.out(PCI_DATA, 4, r.choice((EDU_BAR, 0, 0xFED90000, 0x100000, DATA_BASE,
                                                 g.value(4))))]
        else:                                # other widths at the address port (0xCF9: reset)
            ops.append(["in", PCI_ADDR + r.choice((0, 1, 2, 3)), r.choice((1, 2))])
    if dev == 3 and r.random() < 0.5:        # MSI capability of edu (64-bit: ctrl, addr, data)
        ops += _msi_setup(g)
    return ops


def _msi_setup(g: _Gen) -> list:
    r = g.r
    ops = []
    remap = "intel-iommu" in g.devices and r.random() < 0.5
    if remap:                                # remappable format: handle, SHV, SHV subhandle
        handle = r.choice((0, 1, 2, 255, r.getrandbits(16)))
        addr = 0xFEE00010 | (handle & 0x7FFF) << 5 | (handle >> 15) << 2 | \
            (8 if r.random() < 0.3 else 0)
    else:
        addr = 0xFEE00000 | r.choice((0, 1, 2, 0xFF)) << 12 | (r.randrange(4) << 2 if r.random() < 0.2 else 0)
    data = r.choice((0x20 + r.randrange(0xD0), 0, 0x4000 | r.randrange(256), g.value(2)))
    for reg, size, v in ((0x44, 4, addr), (0x48, 4, 0 if r.random() < 0.9 else g.value(4)),
                         (0x4C, 2, data), (0x40, 4, (1 << 16) if r.random() < 0.8 else g.value(4))):
        ops.append(g.out(PCI_ADDR, 4, _cfg_addr(g, 3, 0, reg)))
        ops.append(g.out(PCI_DATA + (reg & 3) + (2 if reg == 0x40 and size == 2 else 0), size, v))
    return ops


def _edu(g: _Gen) -> list:
    r = g.r
    ops = []
    if r.random() < 0.7:                     # memory space and bus master on
        ops.append(g.out(PCI_ADDR, 4, 0x80000000 | EDU_BDF << 8 | 0x04))
        ops.append(g.out(PCI_DATA, 2, r.choice((0x06, 0x06, 0x02, 0x04, 0x406, g.value(2)))))
    if r.random() < 0.4:
        ops += _msi_setup(g)
    B = EDU_BAR
    for _ in range(r.randint(1, 6)):
        k = r.random()
        if k < 0.35:                         # a DMA: source, destination, count, command
            to_ram = r.random() < 0.5
            n = r.choice((0, 1, 4, 8, 64, 4096, 4097, 0x10000, 1 << 32, (1 << 64) - 1,
                          r.getrandbits(16)))
            ram = g.addr(min(n, 0x2000), 1, ram_weight=0.5)
            buf = EDU["BUF"] + r.choice((0, 0, 0x800, 0xFFF, 0x1000, -8))    # device address
            src, dst = (buf, ram) if to_ram else (ram, buf)
            cmd = 1 | (2 if to_ram else 0) | (4 if r.random() < 0.5 else 0)
            if r.random() < 0.1:
                cmd = g.value(8)
            for reg, v in ((EDU["SRC"], src), (EDU["DST"], dst), (EDU["CNT"], n)):
                if g.mode == "long" or r.random() < 0.3:
                    ops.append(g.mw(B + reg, 8, v))
                else:
                    ops += [g.mw(B + reg, 4, v), g.mw(B + reg + 4, 4, v >> 32)]
            ops.append(g.mw(B + EDU["CMD"], r.choice((4, 8)) if g.mode == "long" else 4, cmd))
            ops.append(["r", B + EDU["CMD"], 4])
        elif k < 0.5:
            ops += [g.mw(B + EDU["STATUS"], 4, r.choice((0x80, 0, 0xFF))),
                    g.mw(B + EDU["FACT"], 4, r.choice((0, 1, 5, 12, 13, 64, 65, 0xFFFFFFFF))),
                    ["r", B + EDU["FACT"], 4], ["r", B + EDU["STATUS"], 4]]
        elif k < 0.65:
            ops += [g.mw(B + EDU["RAISE"], 4, r.choice((1, 0x100, 0xFFFFFFFF, g.value(4)))),
                    ["r", B + EDU["ISR"], 4], ["pause", r.choice((1, 50, 500))],
                    g.mw(B + EDU["ACK"], 4, r.choice((1, 0x100, 0xFFFFFFFF, g.value(4))))]
        elif k < 0.8:                        # registers at every width and alignment
            ops.append(g.reg_access(B, r.choice(list(EDU.values())[:-1]) + r.choice((0, 0, 4))))
        else:                                # the DMA buffer, and past it
            ops.append(g.reg_access(B + EDU["BUF"], r.choice((0, 8, 0xFF8, 0xFFC, 0x1000,
                                                              r.randrange(0x1000)))))
    return ops


def _vtd_tables(g: _Gen) -> int:
    """Root table -> context table -> second-level page table for edu's requester id, written
    by the host; returns the root table's address (RTADDR)."""
    r = g.r
    root = g.addr(0x1000, 0x1000, ram_weight=0.75)
    ctx = g.addr(0x1000, 0x1000, ram_weight=0.75)
    levels = r.choice((3, 4))
    tables = [g.addr(0x1000, 0x1000, ram_weight=0.8) for _ in range(levels)]
    target = g.addr(0x1000, 0x1000, ram_weight=0.5)
    iova = r.choice((0, 0x1000, DATA_BASE, g.addr(8, 0x1000), 1 << 39, r.getrandbits(48)))
    bus = 0 if r.random() < 0.9 else r.randrange(256)
    g.put(root + bus * 16, struct.pack("<QQ", (ctx | (1 if r.random() < 0.9 else 0)) &
                                       ((1 << 64) - 1), 0 if r.random() < 0.9 else g.value(8)))
    tt = r.choice((0, 0, 0, 2, 1, 3))
    aw = {3: 1, 4: 2}[levels] if r.random() < 0.9 else r.randrange(8)
    lo = tables[0] | tt << 2 | (1 if r.random() < 0.9 else 0) | (2 if r.random() < 0.1 else 0)
    hi = aw | r.randrange(1 << 16) << 8
    devfn = EDU_BDF if r.random() < 0.9 else r.randrange(256)
    g.put(ctx + devfn * 16, struct.pack("<QQ", lo & ((1 << 64) - 1), hi))
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        idx = (iova >> shift) & 0x1FF
        nxt = target if level == 1 else tables[levels - level + 1]
        pte = nxt | r.choice((3, 3, 3, 1, 2, 0))
        if level in (2, 3) and r.random() < 0.15:
            pte |= 0x80                      # a 2 MiB / 1 GiB page
        if r.random() < 0.05:
            pte = g.value(8)
        g.put(tables[levels - level] + idx * 8, struct.pack("<Q", pte & ((1 << 64) - 1)))
    return root


def _vtd_queue(g: _Gen) -> list:
    """An invalidation queue with random descriptors (wait descriptors write status words at
    random addresses); returns the ops that program IQA, enable it and move the tail."""
    r = g.r
    qs = 0 if r.random() < 0.8 else r.randrange(8)
    q = g.addr(0x1000 << qs if qs < 3 else 0x1000, 0x1000, ram_weight=0.7)
    n = r.randint(1, 8)
    desc = bytearray()
    for _ in range(n):
        t = r.choice((1, 2, 3, 4, 5, 5, 5, 6, 7, 0, r.randrange(16)))
        if t == 5:
            status_addr = g.addr(4, 4)
            lo = 5 | (r.choice((0x10, 0x20, 0x30, 0x40, 0x20)) & 0x70) | r.getrandbits(32) << 32
            desc += struct.pack("<QQ", lo, status_addr & ~3 & ((1 << 64) - 1))
        elif r.random() < 0.1:
            desc += r.randbytes(16)
        else:
            desc += struct.pack("<QQ", t | (r.getrandbits(12) << 4 if r.random() < 0.3 else 0x30),
                                g.value(8) if t in (2, 3, 4) else 0)
    g.put(q, bytes(desc))
    B = VTD_BASE
    tail = n * 16 if r.random() < 0.85 else r.choice((g.value(4), 0x7FFF0, 8, (n * 16) | 8))
    ops = _vtd_w64(g, B + VTD["IQA"], q | qs | (0x800 if r.random() < 0.1 else 0))
    ops.append(["rmw", B + VTD["GSTS"], B + VTD["GCMD"], 4, GSTS_TO_GCMD, GCMD_QIE])
    ops.append(g.mw(B + VTD["IQT"], r.choice((4, 8)) if g.mode == "long" else 4, tail))
    ops += [["r", B + VTD["IQH"], 4], ["r", B + VTD["ICS"], 4], ["r", B + VTD["FSTS"], 4]]
    if r.random() < 0.3:
        ops.append(g.mw(B + VTD["ICS"], 4, 1))
    return ops


def _vtd_w64(g: _Gen, addr: int, value: int) -> list:
    if g.mode == "long" and g.r.random() < 0.7:
        return [g.mw(addr, 8, value)]
    return [g.mw(addr, 4, value), g.mw(addr + 4, 4, value >> 32)]


def _vtd(g: _Gen) -> list:
    r = g.r
    B = VTD_BASE
    blocks = []
    if r.random() < 0.7:                     # DMA remapping on
        root = _vtd_tables(g)
        blocks.append(_vtd_w64(g, B + VTD["RTADDR"], root | (r.choice((0, 0x400, 0x800))
                                                              if r.random() < 0.1 else 0)) + [
            ["rmw", B + VTD["GSTS"], B + VTD["GCMD"], 4, GSTS_TO_GCMD, GCMD_SRTP],
            ["r", B + VTD["GSTS"], 4],
            g.mw(B + VTD["CCMD"] + 4, 4, 0xA0000000),            # global context invalidation
            g.mw(B + VTD["IOTLB"] + 4, 4, 0x90000000),           # global IOTLB invalidation
            ["rmw", B + VTD["GSTS"], B + VTD["GCMD"], 4, GSTS_TO_GCMD, GCMD_TE]])
    if r.random() < 0.5:
        blocks.append(_vtd_queue(g))
    if r.random() < 0.5:                     # interrupt remapping: IRTA and IRTEs
        s = r.choice((0, 1, 3, 7, 15))
        irta = g.addr(16 << (s + 1) if s < 8 else 0x1000, 0x1000, ram_weight=0.7)
        irtes = b"".join(struct.pack("<QQ", (1 | r.choice((0x20 << 16, 0x40 << 16, g.value(2) << 16))
                                             | r.choice((0, 1 << 40, 0xFF << 40))
                                             | (r.randrange(8) << 5 if r.random() < 0.2 else 0)
                                             | (g.value(8) & 0xF000 if r.random() < 0.1 else 0))
                                            & ((1 << 64) - 1),
                                             EDU_BDF | (r.randrange(4) << 16 if r.random() < 0.2 else 0))
                         for _ in range(r.randint(1, 4)))
        g.put(irta, irtes)
        blocks.append(_vtd_w64(g, B + VTD["IRTA"], irta | s | (0x800 if r.random() < 0.2 else 0)) + [
            ["rmw", B + VTD["GSTS"], B + VTD["GCMD"], 4, GSTS_TO_GCMD, GCMD_SIRTP],
            ["rmw", B + VTD["GSTS"], B + VTD["GCMD"], 4, GSTS_TO_GCMD, GCMD_IRE]])
        if "edu" in g.devices:               # a remapped MSI from edu
            blocks.append(_msi_setup(g) + [g.out(PCI_ADDR, 4, 0x80000000 | EDU_BDF << 8 | 4),
                                           g.out(PCI_DATA, 2, 6),
                                           g.mw(EDU_BAR + EDU["RAISE"], 4, 1)])
    fault = [["r", B + VTD["FSTS"], 4], g.mw(B + VTD["FSTS"], 4, r.choice((0x7F, 0xFFFFFFFF, 2, 1))),
             g.mw(B + VTD["FECTL"], 4, r.choice((0, 1 << 31, g.value(4)))),
             g.mw(B + VTD["FEDATA"], 4, r.choice((0x30, g.value(4)))),
             g.mw(B + VTD["FEADDR"], 4, r.choice((0xFEE00000, g.value(4)))),
             g.mw(B + VTD["FEUADDR"], 4, g.value(4) if r.random() < 0.2 else 0),
             ["r", B + VTD["FRCD"] + r.choice((0, 8, 12, 16)), r.choice((4, 8)) if g.mode == "long" else 4],
             g.mw(B + VTD["FRCD"] + 12, 4, 0x80000000)]
    blocks.append(r.sample(fault, r.randint(1, len(fault))))
    if "edu" in g.devices and r.random() < 0.8:
        blocks.append(_edu(g))
    for _ in range(r.randint(0, 4)):         # every register, every width, every value
        blocks.append([g.reg_access(B, r.choice(list(VTD.values()) + [r.randrange(0x1000)]))])
    if r.random() < 0.15:
        blocks.append([g.mw(B + VTD["GCMD"], 4, g.value(4))])
    r.shuffle(blocks) if r.random() < 0.2 else None
    return [op for b in blocks for op in b]


def _rtc(g: _Gen) -> list:
    r = g.r
    ops = []

    def wr(reg, v):
        ops.append(g.out(RTC_INDEX, 1, reg | (0x80 if r.random() < 0.1 else 0)))
        ops.append(g.out(RTC_DATA, 1, v))

    def rd(reg):
        ops.append(g.out(RTC_INDEX, 1, reg))
        ops.append(["in", RTC_DATA, r.choice((1, 1, 1, 2, 4))])

    k = r.random()
    if k < 0.35:                             # an alarm that can never match, then many writes
        for reg in (1, 3, 5):
            wr(reg, r.choice((0x7F, 0x60, 0xFF, 0x3C, 0x99, 0xC0, 0xFE)))
        wr(0xB, r.choice((0x22, 0x26, 0x62, 0x72, 0x20)))
        for _ in range(r.randint(5, 30)):
            wr(r.choice((0, 2, 4, 0xA, 0xB, 0x30, r.randrange(0x80))), g.value(1))
    elif k < 0.6:                            # periodic interrupts at every rate
        wr(0xA, r.choice((0x21, 0x23, 0x26, 0x2F, 0x20, 0x60, 0x70, 0x0F, g.value(1))))
        wr(0xB, r.choice((0x42, 0x46, 0x52, 0x40, 0xC2)))
        ops.append(["sti", r.choice((10, 200, 2000))])
        rd(0xC)
    else:
        for _ in range(r.randint(1, 10)):
            reg = r.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0x0E, 0x0F, 0x14,
                            0x32, 0x34, 0x5B, 0x7F, r.randrange(0x80), r.getrandbits(8)))
            rd(reg) if r.random() < 0.5 else wr(reg, g.value(1))
    if r.random() < 0.2:
        ops.append(g.reg_access(RTC_INDEX, r.randrange(2), port=True))
    return ops


def _pm(g: _Gen) -> list:
    r = g.r
    ops = []
    for _ in range(r.randint(1, 6)):
        k = r.random()
        if k < 0.25:
            ops.append(g.out(PM_BASE + 2, 2, r.choice((0x1, 0x20, 0x100, 0x400, 0x521, g.value(2)))))
        elif k < 0.45:
            ops.append(g.out(PM_BASE, 2, r.choice((0xFFFF, 0x8000, 0x400, 0x1, g.value(2)))))
        elif k < 0.7:                        # SCI_EN and sleep types without SLP_EN
            ops.append(g.out(PM_BASE + 4, 2, (r.randrange(8) << 10 | r.randrange(8)) & ~(1 << 13)))
        elif k < 0.85:
            ops.append(["in", PM_BASE + 8, r.choice((4, 4, 2, 1))])
        else:
            ops.append(g.reg_access(PM_BASE, r.randrange(12), port=True))
    if r.random() < 0.3:
        ops.append(["sti", r.choice((10, 500))])
    return [["in", PM_BASE + 4, 2] if _sets_slp_en(op) else op for op in ops]


def _sets_slp_en(op) -> bool:
    """Whether an op is an ``out`` that writes SLP_EN (PM1a_CNT bit 13, in the byte at
    PM_BASE + 5): sleeping ends a case, so only :func:`_power` does it."""
    if op[0] != "out" or not op[1] <= PM_BASE + 5 < op[1] + op[2]:
        return False
    return bool((op[3] >> (8 * (PM_BASE + 5 - op[1]))) & 0x20)


def _testdev(g: _Gen) -> list:
    r = g.r
    ops = []
    for _ in range(r.randint(1, 6)):
        k = r.random()
        if k < 0.3:
            ops.append(g.reg_access(r.choice(TESTDEV_PORTS), 0, port=True))
        elif k < 0.45:
            ops.append(g.out(TESTDEV_IRQ + r.randrange(24 + 2), 1, r.choice((0, 1, 1, 0xFF))))
        elif k < 0.85:
            ops.append(g.reg_access(TESTDEV_IOMEM, r.choice((0, 8, 0x100, 0xFFF8, 0xFFFC,
                                                             r.randrange(0x10000)))))
        else:                                # string forms through the I/O memory
            n = r.choice((1, 8, 64, 512))
            src = g.data(n * 8, 8)
            g.put(src, r.randbytes(n * 8))
            size = r.choice((1, 2, 4, 8)) if g.mode == "long" else r.choice((1, 2, 4))
            if r.random() < 0.5:
                ops.append(g.str_op("movs", TESTDEV_IOMEM + r.randrange(0x10000 - n * 8 + 16),
                                    size, n, src))
            else:
                ops.append(g.str_op("outs", r.choice(TESTDEV_PORTS), r.choice((1, 2, 4)), n, src))
    return ops


def _uart(g: _Gen) -> list:
    r = g.r
    ops = []
    if r.random() < 0.5:                     # loopback: what is sent is received
        ops += [g.out(COM1 + 4, 1, 0x10 | r.randrange(16)), g.out(COM1, 1, g.value(1)),
                ["in", COM1 + 5, 1], ["in", COM1, 1], ["in", COM1 + 6, 1]]
    for _ in range(r.randint(1, 8)):
        k = r.random()
        if k < 0.2:                          # the divisor latch
            ops += [g.out(COM1 + 3, 1, 0x80 | r.randrange(0x80)), g.out(COM1, 1, g.value(1)),
                    g.out(COM1 + 1, 1, g.value(1)), g.out(COM1 + 3, 1, r.randrange(0x80))]
        elif k < 0.4:
            ops.append(g.out(COM1 + 1, 1, r.choice((0, 1, 2, 0xF, 0xFF))))
        elif k < 0.5:
            ops.append(g.out(COM1 + 2, 1, r.choice((0, 1, 7, 0xC7, 0xFF))))
        elif k < 0.8:
            ops.append(g.reg_access(COM1, r.randrange(8), port=True))
        else:
            n = r.choice((1, 16, 100))
            src = g.data(n, 1)
            g.put(src, bytes(0x20 + r.randrange(0x5F) for _ in range(n)))
            ops.append(g.str_op("outs", COM1, 1, n, src))
    return ops


def _port92(g: _Gen) -> list:
    r = g.r
    return [["in", PORT92, 1], g.out(PORT92, 1, g.value(1) & ~1), ["in", PORT92, r.choice((1, 2, 4))],
            ["in", PCI_RESET, 1], g.out(PCI_RESET, 1, g.value(1) & ~4)]


def _power(g: _Gen) -> list:
    """What ends the machine: a reset (port 0x92 bit 0, 0xCF9), S5, S3 (woken at WAKE_ADDR or
    an RTC alarm), another sleep type."""
    r = g.r
    k = r.random()
    if k < 0.25:
        return [g.out(PORT92, 1, r.choice((1, 3, 0xFF)))]
    if k < 0.5:
        return [g.out(PCI_RESET, 1, r.choice((0x02, 0x06, 0x0E, 0x04)))]
    typ = r.choice((0, 1, 1, 1, 2, 5, 7))
    ops = []
    if typ == 1 and r.random() < 0.4:        # wake by the RTC alarm (RTC_EN, AIE)
        ops += [g.out(PM_BASE + 2, 2, 0x400), g.out(RTC_INDEX, 1, 0xB), g.out(RTC_DATA, 1, 0x22)]
        for reg in (1, 3, 5):
            ops += [g.out(RTC_INDEX, 1, reg), g.out(RTC_DATA, 1, r.choice((0xFF, 0x7F, 0xC0)))]
    return ops + [g.out(PM_BASE + 4, 2, 1 | typ << 10 | 1 << 13)]


def _lapic(g: _Gen) -> list:
    """Software-enable the local APIC (SVR) so that interrupts reach the IDT's handlers."""
    return [g.mw(LAPIC + 0xF0, 4, 0x1FF), ["sti", g.r.choice((10, 100, 1000))]]


RECIPES = (
    (12, _random_access, None), (6, _fwcfg, None), (8, _pci, None), (12, _vtd, "intel-iommu"),
    (10, _edu, "edu"), (7, _rtc, None), (4, _pm, None), (5, _testdev, None), (5, _uart, None),
    (2, _port92, None), (2, _lapic, None),
)


def _program(g: _Gen, nops: int, focus) -> list:
    recipes = [(w * (4 if fn is focus else 1), fn) for w, fn, need in RECIPES
               if need is None or need in g.devices]
    weights = [w for w, _ in recipes]
    fns = [fn for _, fn in recipes]
    ops: List[list] = []
    while len(ops) < nops:
        ops += g.r.choices(fns, weights)[0](g)
        if g.r.random() < 0.1:
            ops.append(["pause", g.r.choice((1, 20, 300))])
    return [_tame(op) for op in ops]


def _tame(op: list) -> list:
    """The op without what ends the machine (a reset through port 0x92 bit 0 or 0xCF9 bit 2,
    SLP_EN): random accesses would end most cases early; :func:`_power` adds those on purpose."""
    if op[0] != "out":
        return op
    if _sets_slp_en(op):
        return ["in", PM_BASE + 4, 2]
    port, size, value = op[1], op[2], op[3]
    for reg, bit in ((PORT92, 1), (PCI_RESET, 4)):
        if port <= reg < port + size:
            value &= ~(bit << (8 * (reg - port)))
    return [op[0], port, size, value]


def _noise(g: _Gen, bits: int) -> list:
    s = _DevStream(g.r, bits, 0, page_tables=False)
    for _ in range(g.r.randint(1, 4)):
        getattr(s, g.r.choice(_DevStream.NOISE))()
    return ["raw", bytes(s.code).hex()]


def generate_case(seed: int, index: int, *, modes=MODES, max_vcpus: int = MAX_VCPUS,
                  deadline: float = DEFAULT_DEADLINE) -> dict:
    """Device case ``index`` of run ``seed`` (a pure function of its arguments)."""
    rng = random.Random(f"pykvm-fuzz-devices:{seed}:{index}")
    modes = [m for m in MODES if m in modes] or list(MODES)
    mode = rng.choice(modes)
    devices = [d for d in ("edu", "intel-iommu") if rng.random() < 0.7]
    ram = rng.choice((MIN_RAM, MIN_RAM, 32 << 20, (24 << 20) + 0x3000, 64 << 20, 4 << 30)) \
        if rng.random() < 0.97 else rng.choice((L.GiB * 3 + (512 << 20), 5 << 30))
    nv = 1 if max_vcpus == 1 or rng.random() < 0.45 else rng.randint(2, min(max_vcpus, MAX_VCPUS))
    g = _Gen(rng, ram=ram, mode=mode, devices=devices)
    focus = rng.choice([fn for _, fn, need in RECIPES if need is None or need in devices])
    vcpus = []
    for _ in range(nv):
        ops = _program(g, rng.randint(4, 40), focus)
        if rng.random() < 0.15:
            for _ in range(rng.randint(1, 3)):
                ops.insert(rng.randrange(len(ops) + 1), _noise(g, 64 if mode == "long" else 32))
        vcpus.append({"ops": ops})
    if rng.random() < 0.08:                  # a reset or sleep somewhere in one vCPU's ops
        ops = rng.choice(vcpus)["ops"]
        at = rng.randrange(len(ops) + 1)
        ops[at:at] = _power(g)
    return {
        "format": CASE_FORMAT, "seed": seed, "index": index, "mode": mode, "deadline": deadline,
        "ram": ram, "devices": devices, "native": rng.random() < 0.85,
        "idt": rng.random() < 0.9, "wake_x": rng.random() < 0.3,
        "items": g.items, "vcpus": vcpus, "blobs": g.blobs,
    }


def case_to_json(case: dict) -> dict:
    """``case`` with its blobs in JSON form (a reproducer's "case")."""
    return dict(case, blobs=blobs_to_json(case["blobs"]))


def case_from_json(d: dict) -> dict:
    """The inverse of :func:`case_to_json`; ValueError for a document of another format."""
    if d.get("format") != CASE_FORMAT:
        raise ValueError(f"not a pykvm device fuzz case (format {d.get('format')!r})")
    return dict(d, blobs=blobs_from_json(d["blobs"]))


# ================================================================================================
# Assembling a vCPU's operations
# ================================================================================================

class _Asm:
    """x86 code for a list of ops in 32- or 64-bit code (registers: rbx address, rax value, rdx
    port, rcx count, rsi/rdi string buffers)."""

    def __init__(self, bits: int, vcpu: int):
        self.bits = bits
        self.vcpu = vcpu
        self.code = bytearray()

    def movi(self, reg: int, value: int) -> None:
        value &= (1 << 64) - 1
        if self.bits == 64 and value >> 32:
            self.code += bytes([0x48 | (reg >> 3), 0xB8 + (reg & 7)]) + le_bytes(value, 8)
        else:
            self.code += bytes([0xB8 + reg]) + le_bytes(value, 4)

    def _w(self) -> bytes:
        return b"\x48" if self.bits == 64 else b""

    def store(self, size: int) -> None:
        """Store rax (width ``size``) at [rbx]."""
        if size == 8 and self.bits == 32:                       # MMX: movq mm0 -> [ebx]
            self.code += b"\x0F\x7F\x03"
            return
        self.code += {1: b"\x88\x03", 2: b"\x66\x89\x03", 4: b"\x89\x03",
                      8: b"\x48\x89\x03"}[size]

    def load(self, size: int) -> None:
        if size == 8 and self.bits == 32:
            self.code += b"\x0F\x6F\x03"                         # movq mm0, [ebx]
            return
        self.code += {1: b"\x8A\x03", 2: b"\x66\x8B\x03", 4: b"\x8B\x03",
                      8: b"\x48\x8B\x03"}[size]

    def mmx_value(self, value: int) -> None:
        """mm0 = ``value`` through this vCPU's scratch slot."""
        scratch = SCRATCH_ADDR + 16 * self.vcpu
        self.code += b"\xC7\x05" + le_bytes(scratch, 4) + le_bytes(value, 4)
        self.code += b"\xC7\x05" + le_bytes(scratch + 4, 4) + le_bytes(value >> 32, 4)
        self.code += b"\x0F\x6F\x05" + le_bytes(scratch, 4)

    def delay(self, n: int) -> None:
        self.movi(1, max(1, n))
        self.code += b"\xF3\x90\xE2\xFC"                         # pause; loop $-2

    def op(self, op: list) -> None:
        kind = op[0]
        c = self.code
        if kind in ("out", "in"):
            self.movi(2, op[1])
            if kind == "out":
                self.movi(0, op[3])
                c += {1: b"\xEE", 2: b"\x66\xEF", 4: b"\xEF"}[op[2]]
            else:
                c += {1: b"\xEC", 2: b"\x66\xED", 4: b"\xED"}[op[2]]
        elif kind in ("outs", "ins"):
            _, port, size, count, buf = op
            self.movi(2, port)
            self.movi(6 if kind == "outs" else 7, buf)
            self.movi(1, count)
            c += b"\xFC" + {1: b"\xF3", 2: b"\x66\xF3", 4: b"\xF3"}[size] + \
                bytes([(0x6E if kind == "outs" else 0x6C) + (size > 1)])
        elif kind == "w":
            _, addr, size, value = op
            if size == 8 and self.bits == 32:
                self.mmx_value(value)
            else:
                self.movi(0, value)
            self.movi(3, addr)
            self.store(size)
        elif kind == "r":
            self.movi(3, op[1])
            self.load(op[2])
        elif kind == "movs":
            _, dst, size, count, src = op
            self.movi(7, dst)
            self.movi(6, src)
            self.movi(1, count)
            if size == 8 and self.bits == 32:
                size = 4
            c += b"\xFC\xF3" + {1: b"\xA4", 2: b"\x66\xA5", 4: b"\xA5", 8: b"\x48\xA5"}[size]
        elif kind == "rmw":
            _, src, dst, size, and_mask, or_mask = op
            size = min(size, 4 if self.bits == 32 else 8)
            self.movi(3, src)
            self.load(size)
            self.movi(1, and_mask)
            c += self._w() + b"\x21\xC8"                       # and rax, rcx
            self.movi(1, or_mask)
            c += self._w() + b"\x09\xC8"                       # or rax, rcx
            self.movi(3, dst)
            self.store(size)
        elif kind == "pause":
            self.delay(op[1])
        elif kind == "sti":
            c += b"\xFB"
            self.delay(op[1])
            c += b"\xFA"
        elif kind == "raw":
            c += bytes.fromhex(op[1])
        else:
            raise ValueError(f"unknown device-case op {kind!r}")

    def tail(self, nvcpus: int) -> None:
        """vCPU 0 waits (boundedly) for the others to count themselves done, then writes
        DONE_VALUE to isa-debug-exit; the others count themselves done and halt."""
        c = self.code
        self.movi(3, DONE_ADDR)
        if self.vcpu == 0:
            if nvcpus > 1:
                self.movi(1, 200000)
                # L: mov eax,[rbx]; cmp eax, n-1; jae +4; pause; loop L
                c += b"\x8B\x03\x83\xF8" + bytes([nvcpus - 1]) + b"\x73\x04\xF3\x90\xE2\xF5"
            c += bytes([0xB0, DONE_VALUE, 0xE6, 0xF4])
        else:
            c += b"\xF0\xFF\x03"                                 # lock inc dword [rbx]
        c += b"\xFA\xF4\xEB\xFD"                                 # cli; hlt; jmp hlt


def assemble(case: dict) -> bytes:
    """The flat image of ``case``: vCPU i's code at CODE_BASE + i * CODE_STRIDE."""
    bits = 64 if case["mode"] == "long" else 32
    image = bytearray()
    for i, v in enumerate(case["vcpus"]):
        a = _Asm(bits, i)
        a.code += b"\xFC"                                        # cld
        for op in v["ops"]:
            a.op(op)
        a.tail(len(case["vcpus"]))
        if len(a.code) > CODE_STRIDE:
            raise ValueError(f"vCPU {i}'s code is {len(a.code)} bytes (at most {CODE_STRIDE})")
        image += bytes(CODE_STRIDE * i - len(image)) + a.code
    return bytes(image)


def idt_bytes(bits: int) -> bytes:
    """256 gates: vectors 0-31 to the exception handler, the rest to the interrupt handler."""
    out = bytearray()
    exc, irq = HANDLER_ADDR, HANDLER_ADDR + 0x40
    for v in range(256):
        off = exc if v < 32 else irq
        out += struct.pack("<Q", (off & 0xFFFF) | L.SEL_CODE << 16 | 0x8E << 40 |
                           ((off >> 16) & 0xFFFF) << 48)
        if bits == 64:
            out += struct.pack("<Q", off >> 32)
    return bytes(out)


def handler_bytes(bits: int) -> bytes:
    """The code at HANDLER_ADDR: the exception handler (isa-debug-exit EXC_VALUE, then halt) and,
    0x40 bytes on, the interrupt handler (a LAPIC EOI, then IRET), for ``bits`` 32 or 64."""
    exc = bytes([0xB0, EXC_VALUE, 0xE6, 0xF4, 0xFA, 0xF4, 0xEB, 0xFD])
    if bits == 64:       # push rax; mov rax, LAPIC EOI; mov dword [rax], 0; pop rax; iretq
        irq = b"\x50\x48\xB8" + le_bytes(LAPIC + 0xB0, 8) + b"\xC7\x00\x00\x00\x00\x00\x58\x48\xCF"
    else:
        irq = b"\x50\xB8" + le_bytes(LAPIC + 0xB0, 4) + b"\xC7\x00\x00\x00\x00\x00\x58\xCF"
    return exc + bytes(0x40 - len(exc)) + irq
