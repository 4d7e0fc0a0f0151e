"""Issue 17, item 2, without KVM: the VT-d IOMMU and the edu device on an MMIO :class:`Bus`.

Both speak the one device protocol (``read(offset, size)``/``write(offset, size, value)``, offsets
from the register window). VT-d's window is fixed (``Vtd.MMIO_RANGES``); edu's is BAR 0, which the
guest moves through PCI configuration space: after every configuration write the platform maps it
again where :meth:`Edu.bar0_window` says (QEMU's ``pci_bar_address``: nowhere while Memory Space
Enable is clear, the BAR holds 0, or a 32-bit BAR reaches 0xFFFFFFFF while software sizes it)."""
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import vtd as V
from pykvm.devices.bus import MMIO_LIMIT, Bus, BusConflict, Device
from pykvm.devices.edu import BAR_SIZE, ID, Edu

BAR = 0xFEA00000
SLOT = 3


class Ram:
    def __init__(self, size=1 << 20):
        self.b = bytearray(size)

    def read(self, a, n):
        return bytes(self.b[a:a + n])

    def write(self, a, d):
        self.b[a:a + len(d)] = d


def machine():
    """A VT-d and an edu on one MMIO bus, edu's ``pci.on_write`` hook mapping BAR 0 again as the
    platform does (a refused range: unmapped)."""
    mem = Ram()
    bus = Bus("mmio", MMIO_LIMIT)
    vtd = V.Vtd(mem, signal_msi=lambda a, d: None)
    for base, size, offset, max_access in V.Vtd.MMIO_RANGES:
        bus.insert(base, size, vtd, offset=offset, max_access=max_access)
    edu = Edu(bdf=SLOT << 3, bar=BAR, intx_line=11, memory=mem, msi=lambda *a: None,
              set_intx=lambda level: None, translate=vtd.translate)
    refused = []

    def config_written():
        edu.config_changed()
        bus.remove(edu)
        base = edu.bar0_window()
        if base is not None:
            try:
                bus.insert(base, Edu.MMIO_SIZE, edu, max_access=Edu.MMIO_MAX_ACCESS)
            except BusConflict as e:
                refused.append(str(e))

    edu.pci.on_write = config_written
    config_written()
    return bus, vtd, edu, refused


def cfg_write(edu, reg, size, value):
    """A guest configuration write, as the PCI host delivers it: the function's registers, then
    its ``on_write`` hook."""
    edu.pci.write(reg, size, value)
    edu.pci.on_write()


def test_both_speak_the_device_protocol_and_declare_their_windows():
    bus, vtd, edu, _ = machine()
    assert isinstance(vtd, Device) and isinstance(edu, Device)
    assert V.Vtd.MMIO_RANGES == ((V.BASE, V.SIZE, 0, 8),)
    assert Edu.MMIO_SIZE == BAR_SIZE and Edu.MMIO_MAX_ACCESS == 8
    assert [(m.base, m.size, m.max_access, m.device) for m in bus.mappings()] == \
        [(BAR, BAR_SIZE, 8, edu), (V.BASE, V.SIZE, 8, vtd)]
    assert bus.read(V.BASE + V.CAP, 8) == V.CAP_VALUE and bus.read(BAR, 4) == ID


def test_bar0_window_follows_memory_enable_and_the_bar():
    _, _, edu, _ = machine()
    assert edu.bar0_window() == BAR
    edu.pci.write(0x04, 2, 0x00)                     # Memory Space Enable off
    assert edu.bar0_window() is None
    edu.pci.write(0x04, 2, 0x02)
    edu.pci.write(0x10, 4, 0xFFFFFFFF)               # sizing: the BAR reads its size mask
    assert edu.pci.read(0x10, 4) == 0xFFF00000 and edu.bar0_window() is None
    edu.pci.write(0x10, 4, 0)                        # unprogrammed
    assert edu.bar0_window() is None
    edu.pci.write(0x10, 4, 0xC0012345)               # bits below the 1 MiB size are read-only
    assert edu.bar0_window() == 0xC0000000
    edu.pci.write(0x10, 4, 0xFFE00000)               # the last 1 MiB below the sizing value
    assert edu.bar0_window() == 0xFFE00000


def test_the_guest_moves_the_window_through_configuration_space():
    bus, _, edu, refused = machine()
    bus.write(BAR + 4, 4, 0x1234)
    cfg_write(edu, 0x10, 4, 0xC0000000)
    assert edu.pci.read(0x10, 4) == 0xC0000000
    assert bus.read(0xC0000000 + 4, 4) == ~0x1234 & 0xFFFFFFFF     # same registers, new place
    assert bus.read(BAR, 4) == 0xFFFFFFFF and bus.unassigned == {BAR: 1}   # old place: nothing
    cfg_write(edu, 0x04, 2, 0x00)                   # memory decoding off: decodes nowhere
    assert bus.read(0xC0000000, 4) == 0xFFFFFFFF and edu.read(0, 4) == ID
    cfg_write(edu, 0x04, 2, 0x02)
    cfg_write(edu, 0x10, 4, 0xFFFFFFFF)             # sizing
    assert edu.pci.read(0x10, 4) == 0xFFF00000 and len(bus.mappings()) == 1
    cfg_write(edu, 0x10, 4, BAR)
    assert bus.read(BAR, 4) == ID and refused == []


def test_a_bar_over_the_iommu_is_refused_and_decodes_nowhere():
    bus, vtd, edu, refused = machine()
    cfg_write(edu, 0x10, 4, V.BASE & ~(BAR_SIZE - 1))      # 1 MiB window covering VT-d's page
    assert len(refused) == 1 and "overlaps" in refused[0]
    assert [m.device for m in bus.mappings()] == [vtd]
    assert bus.read(V.BASE + V.VER, 4) == 0x10               # the IOMMU still answers
    cfg_write(edu, 0x10, 4, BAR)
    assert bus.read(BAR, 4) == ID


@settings(max_examples=300, deadline=None)
@given(offset=st.integers(-16, (1 << 20) + 16), size=st.integers(0, 9),
       value=st.integers(-(1 << 64), (1 << 65)))
def test_no_direct_access_raises(offset, size, value):
    """The protocol's callers may pass anything; the devices answer as their hardware would."""
    bus, vtd, edu, _ = machine()
    for dev in (vtd, edu):
        dev.write(offset, size, value)
        assert 0 <= dev.read(offset, size) < 1 << (8 * max(size, 1))
    assert bus.read(V.BASE + V.CAP, 8) == V.CAP_VALUE and bus.read(BAR, 4) == ID
