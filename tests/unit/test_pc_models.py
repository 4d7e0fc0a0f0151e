"""Issue 10: the PC machine's device models without KVM — fw_cfg, PCI configuration mechanism #1,
ACPI tables, the PM timer and PM1 registers, the CMOS RTC (with a fake clock), the memory map
around the 32-bit hole, boot-structure placement, VT-d translation and interrupt remapping, and
the edu device."""
import struct

import pytest

from pykvm.platform import acpi
from pykvm.arch.x86 import layout
from pykvm.devices import acpi_pm as pm, cmos_rtc as rtc
from pykvm.devices.edu import Edu
from pykvm.devices.fw_cfg import FwCfg
from pykvm.boot.x86_images import _Space
from pykvm.devices.pci_host import PciHost
from pykvm.devices.vtd import BASE as VTD, DmaFault, Vtd

from device_buses import mmio, pio

GiB = 1 << 30
NS = 1_000_000_000


class Clock:
    def __init__(self, t=1_000 * NS):
        self.t = t

    def __call__(self):
        return self.t


class Ram:
    def __init__(self, size=1 << 24):
        self.b = bytearray(size)

    def read(self, a, n):
        return bytes(self.b[a:a + n])

    def write(self, a, d):
        self.b[a:a + len(d)] = d


def test_fw_cfg_items_rewind_and_zeros():
    f = pio(FwCfg(ram_size=6 * GiB, nb_cpus=3))
    f.write_bytes(0x510, 2, (0x03).to_bytes(2, "little"))
    assert int.from_bytes(f.read_bytes(0x511, 1, 8), "little") == 6 * GiB
    assert f.read_bytes(0x511, 1, 2) == b"\0\0"          # past the end
    f.write_bytes(0x510, 2, b"\x05\x00")
    assert f.read_bytes(0x511, 1, 2) == b"\x03\x00"
    f.write_bytes(0x510, 2, b"\x00\x00")
    assert f.read_bytes(0x511, 1, 4) == b"QEMU"
    f.write_bytes(0x510, 2, b"\x34\x12")
    assert f.read_bytes(0x511, 1, 4) == bytes(4)         # unknown key


def test_pci_mechanism_1():
    h = PciHost()
    p = pio(h)
    p.write(0xCF8, 4, 0x8000_0000)
    assert p.read(0xCFC, 4) == 0x1237_8086
    assert p.read(0xCFE, 2) == 0x1237
    p.write(0xCF8, 4, 0x8000_0002)                    # low address bits pick the word, as QEMU
    assert p.read(0xCFC, 2) == 0x1237
    p.write(0xCF8, 4, 0x8000_2800)                    # 00:05.0
    assert p.read(0xCFC, 4) == 0xFFFF_FFFF
    p.write(0xCF8, 4, 0x0000_0000)                    # enable bit clear
    assert p.read(0xCFC, 4) == 0xFFFF_FFFF
    assert p.read(0xCF8, 4) == 0
    resets = []
    h.on_reset = lambda: resets.append(1)
    p.write(0xCF9, 1, 0x06)
    assert resets == [1]


def test_acpi_tables_checksums_and_layout():
    t = acpi.build_tables(0xE0000, 3, iommu=VTD)

    def at(name, n):
        off = t.addr[name] - t.base
        return t.blob[off:off + n]
    assert at("RSDP", 8) == b"RSD PTR " and t.addr["RSDP"] % 16 == 0
    assert sum(at("RSDP", 20)) & 0xFF == 0 and sum(at("RSDP", 36)) & 0xFF == 0
    assert t.addr["FACS"] % 64 == 0 and at("FACS", 4) == b"FACS"
    for name in ("RSDT", "XSDT", "FACP", "APIC", "DSDT", "DMAR"):
        length = struct.unpack_from("<I", at(name, 8), 4)[0]
        assert sum(at(name, length)) & 0xFF == 0, name
    rsdt = at("RSDT", 48)
    assert struct.unpack_from("<3I", rsdt, 36) == (t.addr["FACP"], t.addr["APIC"], t.addr["DMAR"])
    fadt = at("FACP", 244)
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608
    assert at("DMAR", 64)[36] == 38                   # host address width - 1
    assert t.end <= 0xF0000


def test_pm_timer_and_pm1_registers():
    clk = Clock(0)
    sleeps, sci = [], []
    p = pm.AcpiPm(set_sci=sci.append, on_sleep=sleeps.append, clock=clk)
    io = pio(p)
    clk.t = NS                                         # one second: 3579545 ticks
    assert io.read(0x608, 4) == 3_579_545
    clk.t = 5 * NS                                     # past 2^24 ticks: wraps, TMR_STS set
    assert io.read(0x608, 4) == (5 * 3_579_545) & 0xFFFFFF
    assert io.read(0x600, 2) & pm.TMR_STS
    io.write(0x600, 2, pm.TMR_STS)
    assert not io.read(0x600, 2) & pm.TMR_STS
    io.write(0x602, 2, pm.TMR_STS)                      # TMR_EN: the next flip raises the SCI
    clk.t = p.next_timer_flip_ns()
    p.timer_event()
    assert sci == [1]
    assert io.read(0x604, 2) & pm.SCI_EN
    io.write(0x605, 1, 0x24)            # QEMU: a byte at 0x605 is the whole register, zero-extended
    assert sleeps == [] and io.read(0x604, 2) == pm.SCI_EN     # GBL_RLS (bit 2) is write-only
    io.write(0x604, 2, 0x2400)                          # SLP_EN | SLP_TYP 1
    assert sleeps == [1] and not io.read(0x604, 2) & pm.SLP_EN


def make_rtc(**kw):
    clk = Clock()
    # 2026-11-30 02:42:07.500 UTC
    r = rtc.CmosRtc(clock=clk, wall_ns=1_796_006_527 * NS + NS // 2, **kw)
    return r, clk


def test_rtc_time_bcd_binary_and_12_hour():
    r, clk = make_rtc()
    reg = r.read_register
    assert (reg(rtc.HOURS), reg(rtc.MINUTES), reg(rtc.SECONDS)) == (0x02, 0x42, 0x07)
    assert (reg(rtc.YEAR), reg(rtc.MONTH), reg(rtc.DAY_OF_MONTH), reg(rtc.CENTURY)) == \
        (0x26, 0x11, 0x30, 0x20)
    assert reg(rtc.DAY_OF_WEEK) == 2                   # a Monday (Sunday = 1)
    r.write_register(rtc.REG_B, rtc.B_DM)              # binary, 12-hour
    assert (reg(rtc.HOURS), reg(rtc.SECONDS)) == (2, 7)
    clk.t += 10 * 3600 * NS                            # 12:42 -> 12 PM
    assert reg(rtc.HOURS) == 0x80 | 12


def test_rtc_uip_window_and_polling():
    r, clk = make_rtc()
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP
    clk.t += NS // 2 - 100_000                         # 100 µs before the update
    assert r.read_register(rtc.REG_A) & rtc.A_UIP
    clk.t += 200_000
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP
    # a poller whose reads straddle the window still sees UIP once
    clk.t += NS - 1_000_000                            # 1 ms before the next update
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP
    clk.t += 2_000_000
    assert r.read_register(rtc.REG_A) & rtc.A_UIP
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP
    # but a read long after an update does not
    clk.t += 3 * NS
    assert not r.read_register(rtc.REG_A) & rtc.A_UIP


def test_rtc_alarm_update_and_periodic_flags_and_irq():
    irq, alarms = [], []
    r, clk = make_rtc(set_irq=irq.append, on_alarm=lambda: alarms.append(1))
    r.write_register(rtc.SECONDS_ALARM, 0x10)          # :10, any minute and hour
    r.write_register(rtc.MINUTES_ALARM, 0xC0)
    r.write_register(rtc.HOURS_ALARM, 0xC0)
    r.write_register(rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    r.read_register(rtc.REG_C)
    when = r.next_event_ns()
    assert when == clk.t + NS // 2 + 2 * NS            # 02:42:10.000
    clk.t = when - 1
    r.poll()
    assert irq == [] and alarms == []
    clk.t = when
    r.poll()
    assert irq == [1] and alarms == [1]
    c = r.read_register(rtc.REG_C)
    assert c & (rtc.C_IRQF | rtc.C_AF | rtc.C_UF) == rtc.C_IRQF | rtc.C_AF | rtc.C_UF
    assert irq == [1, 0] and r.read_register(rtc.REG_C) == 0
    assert rtc.periodic_ns(6) == NS // 1024 and rtc.periodic_ns(0) is None


def test_rtc_set_freezes_and_restarts():
    r, clk = make_rtc()
    r.write_register(rtc.REG_B, rtc.B_24H | rtc.B_SET)
    for reg, v in ((rtc.HOURS, 0x12), (rtc.MINUTES, 0x34), (rtc.SECONDS, 0x56)):
        r.write_register(reg, v)
    clk.t += 5 * NS                                    # frozen
    assert r.read_register(rtc.SECONDS) == 0x56
    r.write_register(rtc.REG_B, rtc.B_24H)
    clk.t += 2 * NS
    assert (r.read_register(rtc.HOURS), r.read_register(rtc.SECONDS)) == (0x12, 0x58)


@pytest.mark.parametrize("size,split", [(64 << 20, (64 << 20, 0)),
                                        (3 * GiB + (256 << 20), (3 * GiB + (256 << 20), 0)),
                                        (0xE0000000, (3 * GiB, 0x20000000)),
                                        (4 * GiB, (3 * GiB, GiB)), (6 * GiB, (3 * GiB, 3 * GiB))])
def test_ram_split_like_qemu_pc(size, split):
    assert layout.ram_split(size) == split


def test_e820_map_around_the_hole():
    m = layout.e820_map(3 * GiB, 3 * GiB, bios_area=True)
    assert m == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2),
                 (0x100000, 3 * GiB - 0x100000, 1), (0xFFFBC000, 0x44000, 2),
                 (4 * GiB, 3 * GiB, 1)]


def test_boot_structure_placement_skips_what_is_taken():
    s = _Space([(0, 64 << 20)], [(0x8000, 0x3B000)])
    need = layout.DEFAULT_LAYOUT.ranges("protected", 1, 64 << 20)
    assert not all(s.free(r) for r in need)            # the image covers the default stack
    base = s.alloc(layout.BOOT_WINDOW_END, layout.BOOT_WINDOW_ALIGN, lo=layout.BOOT_WINDOW_ALIGN)
    assert base % 0x10000 == 0 and base >= 0x3B000
    assert all(s.free(r) for r in layout.BootLayout(base).ranges("protected", 1, 64 << 20))


def vtd_with_tables(ram, *, devfn=0x18, iova=0x200000, page=0x9000):
    v = Vtd(ram, signal_msi=lambda a, d: None)
    root, ctx, l3, l2, l1 = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    ram.write(root, struct.pack("<Q", ctx | 1))
    ram.write(ctx + devfn * 16, struct.pack("<QQ", l3 | 1, 1))
    ram.write(l3, struct.pack("<Q", l2 | 3))
    ram.write(l2 + 8 * (iova >> 21), struct.pack("<Q", l1 | 3))
    ram.write(l1, struct.pack("<Q", page | 1))          # read-only
    mmio(v).write(VTD + 0x20, 8, root)
    mmio(v).write(VTD + 0x18, 4, 1 << 30)
    mmio(v).write(VTD + 0x18, 4, (1 << 30) | (1 << 31))
    return v


def test_vtd_translation_permissions_and_faults():
    ram = Ram()
    v = vtd_with_tables(ram)
    assert mmio(v).read(VTD + 0x1C, 4) == (1 << 31) | (1 << 30)
    assert v.translate(0x18, 0x200123, False) == 0x9123
    with pytest.raises(DmaFault):
        v.translate(0x18, 0x200123, True)             # no write permission
    with pytest.raises(DmaFault):
        v.translate(0x20, 0x200000, False)            # no context entry
    assert v.faults == 2 and mmio(v).read(VTD + 0x34, 4) & 2


def test_vtd_interrupt_remapping_and_queue():
    ram = Ram()
    sent = []
    v = Vtd(ram, signal_msi=lambda a, d: sent.append((a, d)))
    v.deliver_msi(0xFEE00000, 0x41)                    # IR off: unchanged
    ram.write(0x6000 + 16 * 7, struct.pack("<QQ", 1 | (0x55 << 16) | (2 << 40), 0))
    mmio(v).write(VTD + 0xB8, 8, 0x6000 | 3)
    mmio(v).write(VTD + 0x18, 4, (1 << 24))
    mmio(v).write(VTD + 0x18, 4, (1 << 25))
    v.deliver_msi(0xFEE00000 | 1 << 4 | 7 << 5, 0)     # remappable, handle 7
    v.deliver_msi(0xFEE00000 | 1 << 4 | 8 << 5, 0)     # handle 8: not present, blocked
    assert sent == [(0xFEE00000, 0x41), (0xFEE02000, 0x55)]
    # queued invalidation: a wait descriptor writes its status word
    mmio(v).write(VTD + 0x90, 8, 0x7000)
    mmio(v).write(VTD + 0x18, 4, (1 << 26) | (1 << 25))
    ram.write(0x7000, struct.pack("<QQ", 5 | 1 << 5 | 0xABCD << 32, 0x8000))
    mmio(v).write(VTD + 0x88, 8, 16)
    assert ram.read(0x8000, 4) == struct.pack("<I", 0xABCD)
    assert mmio(v).read(VTD + 0x80, 8) == 16


def test_edu_registers_dma_and_interrupts():
    ram = Ram()
    intx, msis = [], []
    e = Edu(bdf=0x18, bar=0xFEA00000, intx_line=11, memory=ram,
            msi=lambda s, a, d: msis.append((a, d)), set_intx=intx.append)
    e.pci.write(0x04, 2, 0x06)                          # memory, bus master (as QEMU, DMA needs it)
    w = lambda off, v, n=4: mmio(e).write(0xFEA00000 + off, n, v)  # noqa: E731
    r = lambda off, n=4: mmio(e).read(0xFEA00000 + off, n)  # noqa: E731
    assert r(0) == 0x010000ED
    w(4, 5)
    assert r(4) == 0xFFFFFFFA
    w(8, 10)
    assert r(8) == 3628800
    ram.write(0x3000, b"abcd")
    w(0x80, 0x3000, 8), w(0x88, 0x40010, 8), w(0x90, 4, 8), w(0x98, 1)
    w(0x80, 0x40010, 8), w(0x88, 0x3100, 8), w(0x98, 3)
    assert ram.read(0x3100, 4) == b"abcd" and r(0x98) == 2
    w(0x60, 1)
    assert intx == [1] and r(0x24) == 1
    w(0x64, 1)
    assert intx == [1, 0]
    e.pci.write(0x44, 4, 0xFEE00000)
    e.pci.write(0x4C, 2, 0x42)
    e.pci.write(0x42, 1, 1)                             # MSI enable
    w(0x60, 2)
    assert msis == [(0xFEE00000, 0x42)] and intx == [1, 0]
