"""The device bus (pykvm/devices/bus.py, issue 17 item 2): ranges refused where they overlap or
leave the bus, taken off and put back, accesses cut as QEMU's memory core cuts them (by the
range's max_access and the piece's alignment inside the range, not at the range's end),
unassigned bytes (all-ones, dropped, counted with bounded memory), a device's GuestMemoryError
as a master abort, the string-read fast path, and devices attached by the ranges their class
declares."""
import threading

import pytest

from pykvm.devices import acpi_pm
from pykvm.devices.bus import MMIO_LIMIT, PIO_LIMIT, Bus, BusConflict
from pykvm.devices.cmos_rtc import CmosRtc
from pykvm.devices.fw_cfg import FwCfg
from pykvm.devices.i8042 import I8042
from pykvm.devices.pci_host import PciHost
from pykvm.devices.port92 import Port92
from pykvm.devices.testdev import IOMEM_BASE, PcTestdev
from pykvm.errors import GuestMemoryError


class Recorder:
    """Answers each read with ``offset`` in every byte and keeps what it was handed."""

    def __init__(self):
        self.calls = []

    def read(self, offset, size):
        self.calls.append(("r", offset, size))
        return int.from_bytes(bytes([offset & 0xFF]) * size, "little")

    def write(self, offset, size, value):
        self.calls.append(("w", offset, size, value))


class Faulting:
    """A device whose every access meets guest memory it cannot reach (a DMA gone wrong)."""

    def read(self, offset, size):
        raise GuestMemoryError("dma to nowhere")

    def write(self, offset, size, value):
        raise GuestMemoryError("dma to nowhere")

    def read_repeated(self, offset, size, count):
        raise GuestMemoryError("dma to nowhere")


def pio():
    return Bus("pio", PIO_LIMIT)


# -- ranges -------------------------------------------------------------------------------------
def test_overlap_is_refused_naming_both_ranges():
    bus = pio()
    bus.insert(0x60, 1, Recorder(), name="kbd-data")
    for base, size in ((0x5F, 2), (0x60, 1), (0x58, 0x10)):
        with pytest.raises(BusConflict) as e:
            bus.insert(base, size, Recorder(), name="intruder")
        msg = str(e.value)
        assert "kbd-data [0x60, 0x61)" in msg and f"intruder [{base:#x}, {base + size:#x})" in msg
    bus.insert(0x5F, 1, Recorder())                           # neighbours are fine
    bus.insert(0x61, 1, Recorder())
    assert [m.base for m in bus.mappings()] == [0x5F, 0x60, 0x61]


def test_range_outside_the_bus_is_refused():
    bus = pio()
    for base, size in ((0xFFFF, 2), (-1, 1), (PIO_LIMIT, 1)):
        with pytest.raises(BusConflict, match="outside the bus"):
            bus.insert(base, size, Recorder())
    bus.insert(0xFFFF, 1, Recorder())                          # the last port is inside
    with pytest.raises(ValueError):
        bus.insert(0x100, 0, Recorder())
    with pytest.raises(ValueError):
        bus.insert(0x100, 4, Recorder(), max_access=3)
    mmio = Bus("mmio", MMIO_LIMIT)
    with pytest.raises(BusConflict):
        mmio.insert(MMIO_LIMIT - 8, 16, Recorder())


def test_remove_and_insert_again():
    bus = pio()
    dev, other = Recorder(), Recorder()
    bus.insert(0x600, 4, dev, max_access=2)
    bus.insert(0x608, 4, dev, offset=8)
    bus.insert(0x70, 2, other)
    assert bus.remove(dev) == 2 and bus.remove(dev) == 0
    assert bus.find(0x600) is None and bus.read(0x608, 4) == 0xFFFFFFFF
    assert bus.find(0x71).device is other
    bus.insert(0xB008, 4, dev, offset=8)                       # where the guest moved it
    assert bus.read(0xB008, 1) == 8 and bus.find(0x70).device is other


# -- cutting ------------------------------------------------------------------------------------
def test_pieces_follow_max_access_and_alignment_not_the_range_end():
    bus = pio()
    dev = Recorder()
    bus.insert(0x100, 8, dev, offset=0x40, max_access=4)
    bus.read(0x101, 4)                                         # 1 at 0x41, 2 at 0x42, 1 at 0x44
    assert dev.calls == [("r", 0x41, 1), ("r", 0x42, 2), ("r", 0x44, 1)]
    dev.calls.clear()
    assert bus.read(0x104, 4) == 0x44444444                    # aligned: one piece
    assert dev.calls == [("r", 0x44, 4)]
    dev.calls.clear()
    bus.write(0x106, 4, 0xAABBCCDD)                            # the second half starts past
    assert dev.calls == [("w", 0x46, 2, 0xCCDD)]               # the range: unassigned
    assert bus.unassigned == {0x108: 1}
    short = Recorder()
    bus.insert(0x70, 2, short, max_access=4)
    assert bus.read(0x70, 4) == 0 and short.calls == [("r", 0, 4)]   # not cut at its end
    narrow = Recorder()
    bus.insert(0x200, 4, narrow, max_access=1)
    assert bus.read(0x200, 4) == 0x03020100
    assert narrow.calls == [("r", i, 1) for i in range(4)]


def test_unassigned_reads_all_ones_drops_writes_and_counts_bounded():
    bus = pio()
    dev = Recorder()
    bus.insert(0x64, 1, dev, offset=4)
    assert bus.read(0x62, 1) == 0xFF and bus.read(0x50, 4) == 0xFFFFFFFF
    bus.write(0x50, 2, 0x1234)
    assert dev.calls == []
    assert bus.unassigned[0x62] == 1 and bus.unassigned[0x50] == 2
    # QEMU's unassigned I/O region (unassigned_io_ops) is cut by alignment too: the byte at
    # 0x63 is unassigned, the next reaches the device at 0x64
    assert bus.read(0x63, 2) == 0x04FF and dev.calls == [("r", 4, 1)]
    for port in range(0x1000, 0x1000 + 10_000):
        bus.read(port, 1)
    assert len(bus.unassigned) <= 4096
    before = bus.unassigned[0x62]
    bus.read(0x62, 1)
    assert bus.unassigned[0x62] == before + 1                  # known addresses keep counting


def test_guest_memory_error_is_a_master_abort():
    bus = pio()
    bus.insert(0x300, 4, Faulting())
    assert bus.read(0x300, 4) == 0xFFFFFFFF and bus.read(0x301, 2) == 0xFFFF
    bus.write(0x300, 4, 0)                                     # dropped, nothing raised
    assert bus.read_bytes(0x300, 1, 5) == b"\xff" * 5          # fast path
    assert bus.read_bytes(0x300, 2, 3) == b"\xff" * 6
    mmio = Bus("mmio", MMIO_LIMIT)
    mmio.insert(0xFED90000, 0x1000, Faulting(), max_access=8)
    assert mmio.read(0xFED90000, 8) == (1 << 64) - 1


# -- string accesses ----------------------------------------------------------------------------
def test_read_bytes_fast_path_equals_the_slow_path():
    fast, slow = FwCfg(ram_size=1 << 30, nb_cpus=2), FwCfg(ram_size=1 << 30, nb_cpus=2)
    bf, bs = pio(), pio()
    bf.attach(fast)
    bs.attach(slow)
    calls = []
    real = fast.read_repeated
    fast.read_repeated = lambda *a: calls.append(a) or real(*a)
    for key in (0x00, 0x03, 0x8004, 0x19, 0x1234):
        for b in (bf, bs):
            b.write_bytes(0x510, 2, key.to_bytes(2, "little"))
        for port, size, count in ((0x511, 1, 3), (0x511, 1, 200), (0x510, 1, 2), (0x511, 2, 4),
                                  (0x510, 4, 2), (0x511, 1, 0)):
            got = bf.read_bytes(port, size, count)
            want = b"".join(bs.read(port, size).to_bytes(size, "little") for _ in range(count))
            assert got == want, (hex(key), hex(port), size, count)
    assert calls and all(size == 1 for _, size, _ in calls)   # byte strings took one call
    before = len(calls)
    bf.read_bytes(0x511, 1, 1 << 16)
    assert len(calls) == before + 1 and fast.offset <= 1 << 16


# -- devices attached by their class's ranges ---------------------------------------------------
def test_attach_uses_the_class_ranges_of_each_bus():
    bus = pio()
    kbd = I8042()
    maps = bus.attach(kbd)
    assert [(m.base, m.size, m.offset, m.max_access) for m in maps] == list(I8042.PIO_RANGES)
    assert bus.read(0x64, 2) == 0x1C1C and bus.read(0x62, 1) == 0xFF
    t = PcTestdev()
    bus.attach(t)
    mmio = Bus("mmio", MMIO_LIMIT)
    (m,) = mmio.attach(t.iomem)
    assert (m.base, m.size) == (IOMEM_BASE, 0x10000)
    mmio.write(IOMEM_BASE + 0x100, 4, 0xCAFEF00D)
    assert t.iomem[0x100:0x104] == (0xCAFEF00D).to_bytes(4, "little")
    assert mmio.read(IOMEM_BASE + 0x101, 2) == 0xFEF0
    with pytest.raises(ValueError):
        mmio.attach(kbd)                                       # no MMIO_RANGES
    pm = acpi_pm.AcpiPm()
    maps = bus.attach(pm, acpi_pm.pio_ranges(0xB000))
    assert [m.base for m in maps] == [0xB000, 0xB004, 0xB008]
    assert bus.read(0xB004, 2) == acpi_pm.SCI_EN


def test_attach_is_all_or_nothing():
    bus = pio()
    bus.insert(0x608, 4, Recorder(), name="squatter")
    pm = acpi_pm.AcpiPm()
    with pytest.raises(BusConflict, match="squatter"):
        bus.attach(pm)                                         # the timer block collides
    assert all(m.device is not pm for m in bus.mappings())
    assert bus.find(0x600) is None


def test_the_pc_port_devices_fit_on_one_bus():
    bus = pio()
    resets = []
    devs = (I8042(), CmosRtc(), PciHost(), FwCfg(ram_size=1 << 30, nb_cpus=1),
            Port92(on_reset=lambda: resets.append(1)), PcTestdev(), acpi_pm.AcpiPm())
    for d in devs:
        bus.attach(d)
    assert len(bus.mappings()) == sum(len(type(d).PIO_RANGES) for d in devs)
    assert bus.read(0x92, 1) == 0x02
    bus.write(0x92, 1, 0x00)                                   # A20 off: stays on
    assert bus.read(0x92, 1) == 0x02 and resets == []
    bus.write(0x92, 1, 0x01)
    assert resets == [1] and bus.read(0x92, 4) == 0x02        # the whole access, zero-extended
    bus.write_bytes(0x510, 2, b"\x00\x00")
    assert bus.read_bytes(0x511, 1, 4) == b"QEMU"
    bus.write(0xCF8, 4, 0x80000000)
    assert bus.read(0xCFC, 4) == 0x12378086


def test_ranges_move_while_other_threads_access():
    """A guest moving the PM block (remove, attach elsewhere) while vCPUs read: every read
    finds a consistent table and ends in the device or as unassigned, never in an error."""
    bus = pio()
    pm = acpi_pm.AcpiPm()
    bus.attach(pm)
    bus.attach(Recorder(), ((0x700 + 16 * i, 4, 0, 4) for i in range(32)))
    stop = threading.Event()
    errors = []

    def reader():
        try:
            while not stop.is_set():
                for port in (0x604, 0xB004, 0x710, 0x5F0):
                    v = bus.read(port, 2)
                    assert v in (acpi_pm.SCI_EN, 0xFFFF, 0x0000), (hex(port), hex(v))
        except Exception as e:                                 # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(300):
        bus.remove(pm)
        bus.attach(pm, acpi_pm.pio_ranges(0xB000 if i % 2 else 0x600))
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_bad_arguments_are_typed_errors_that_leave_the_bus_as_it_was():
    """Caller mistakes (never the guest's: a guest only chooses addresses and sizes through
    exits) are refused where they are made, and nothing half-done stays on the bus."""
    bus = pio()
    good = Recorder()
    bus.insert(0x60, 1, good)
    with pytest.raises(TypeError, match="is no device"):
        bus.insert(0x70, 1, None)
    for kw in ({"offset": -1}, {"offset": "x"}, {"max_access": 4.0}, {"max_access": 3}):
        with pytest.raises(ValueError):
            bus.insert(0x70, 1, Recorder(), **kw)
    for base in (True, 1.0, "0x70"):
        with pytest.raises(ValueError):
            bus.insert(base, 1, Recorder())
    for size in (0, -1, 9, 16, 1.0, "4", True):
        with pytest.raises(ValueError, match="1 to 8 bytes"):
            bus.read(0x60, size)
        with pytest.raises(ValueError, match="1 to 8 bytes"):
            bus.write(0x60, size, 0)
        with pytest.raises(ValueError, match="1 to 8 bytes"):
            bus.write_bytes(0x60, size, b"abc")
    for size in range(1, 9):                       # every width a guest's MMIO exit can have
        bus.write(0x60, size, 0)
        assert bus.read(0x60, size) >= 0
    with pytest.raises(ValueError, match="count"):
        bus.read_bytes(0x60, 1, -1)

    class D(Recorder):
        PIO_RANGES = ((0x900, 1, 0),)            # three fields, not four
    with pytest.raises(ValueError, match=r"\(base, size, offset, max_access\)"):
        bus.attach(D())
    with pytest.raises(ValueError, match="limit"):
        Bus("pio", -1)
    assert [m.device for m in bus.mappings()] == [good]
    assert bus.read(0x60, 1) == good.read(0, 1)
