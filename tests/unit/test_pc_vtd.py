"""Issue 16, faults 1 and 2, without KVM: the VT-d, edu and PCI host models given hostile values.

Guest memory here behaves as :class:`pykvm.memory.GuestMemory` does: two RAM slots with a hole
between them, :class:`~pykvm.errors.GuestMemoryError` for any byte outside them. No register
write may raise out of a device; bad addresses are reported as the VT-d spec says (fault
recording registers, FSTS, the fault event MSI) and read-only bits hold for every width."""
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.devices import vtd as V
from pykvm.devices.edu import DMA_START, Edu
from pykvm.devices.pci_host import PciHost
from pykvm.errors import GuestMemoryError

from device_buses import mmio, pio

RAM_END = 0x100000                  # slot 0: [0, 1 MiB)
SLOT1 = (0x200000, 0x300000)        # slot 1 after a hole
BAD_ADDRS = [RAM_END, RAM_END - 8, 0x180000, V.BASE, 0xFEE00000, (1 << 64) - 4096,
             (1 << 52) - 4096, SLOT1[1] - 8, SLOT1[1]]
BAD_PAGES = [a for a in BAD_ADDRS if a % 4096 == 0]   # pages with no RAM at all


class Mem:
    """Two RAM slots; anything else raises GuestMemoryError, as GuestMemory does."""

    def __init__(self):
        self.slots = [(0, bytearray(RAM_END)), (SLOT1[0], bytearray(SLOT1[1] - SLOT1[0]))]

    def _chunks(self, gpa, n):
        if gpa < 0 or n < 0:
            raise GuestMemoryError("bad range")
        while n > 0:
            for base, buf in self.slots:
                if base <= gpa < base + len(buf):
                    take = min(n, base + len(buf) - gpa)
                    yield buf, gpa - base, take
                    gpa += take
                    n -= take
                    break
            else:
                raise GuestMemoryError(f"{gpa:#x} is not RAM")

    def read(self, gpa, n):
        return b"".join(bytes(b[o:o + k]) for b, o, k in self._chunks(gpa, n))

    def write(self, gpa, data):
        pos = 0
        for b, o, k in list(self._chunks(gpa, len(data))):
            b[o:o + k] = data[pos:pos + k]
            pos += k


def vtd():
    mem, sent = Mem(), []
    v = V.Vtd(mem, signal_msi=lambda a, d: sent.append((a, d)))
    return v, mem, sent


def w32(v, off, val):
    mmio(v).write(V.BASE + off, 4, val & 0xFFFFFFFF)


def w64(v, off, val):
    mmio(v).write(V.BASE + off, 8, val & (1 << 64) - 1)


def r32(v, off):
    return mmio(v).read(V.BASE + off, 4)


def r64(v, off):
    return mmio(v).read(V.BASE + off, 8)


def enable_fault_events(v):
    w32(v, V.FEDATA, 0x4E)
    w32(v, V.FEADDR, 0xFEE00000)
    w32(v, V.FECTL, 0)                              # unmask


# -- CAP / read-only registers -------------------------------------------------------------------
def test_cap_advertises_the_fault_recording_registers():
    v, _, _ = vtd()
    cap = r64(v, V.CAP)
    assert ((cap >> 24) & 0x3FF) * 16 == V.FRO and ((cap >> 40) & 0xFF) + 1 == V.NFR
    assert V.FRO + 16 * V.NFR <= V.SIZE
    assert (cap >> 8) & 0x1F == 0x2 and ((cap >> 16) & 0x3F) + 1 == 39
    assert r32(v, V.FECTL) == V.FECTL_IM and r32(v, V.IECTL) == V.FECTL_IM


@settings(max_examples=300, deadline=None)
@given(off=st.integers(0, 0x2A0), size=st.sampled_from([1, 2, 4, 8]),
       value=st.integers(0, (1 << 64) - 1))
def test_no_write_changes_read_only_registers(off, size, value):
    v, _, _ = vtd()
    before = {o: r64(v, o) for o in (V.VER, V.CAP, V.ECAP)}
    mmio(v).write(V.BASE + off, size, value & ((1 << 8 * size) - 1))
    assert {o: r64(v, o) for o in (V.VER, V.CAP, V.ECAP)} == before
    assert r32(v, V.IQH) == 0 and r32(v, V.IQH + 4) == 0
    # only GCMD changes GSTS; the bus cuts an access covering all of GCMD (8 bytes at 0x14..0x18)
    # so that one naturally aligned piece of 4 or 8 bytes lands on it, as QEMU's memory core
    if not (off <= V.GCMD and V.GCMD + 4 <= off + size):
        assert r32(v, V.GSTS) == 0


@pytest.mark.parametrize("off,size", [(V.GSTS, 1), (V.GSTS + 1, 1), (V.GSTS + 3, 1), (V.GSTS, 2),
                                      (V.GSTS, 8), (V.GSTS + 2, 4), (V.GCMD + 3, 1),
                                      (V.GCMD + 1, 4), (V.GCMD + 4, 4), (V.VER, 8), (V.CAP, 8)])
def test_gsts_turns_on_only_through_gcmd(off, size):
    v, _, _ = vtd()
    mmio(v).write(V.BASE + off, size, (1 << 8 * size) - 1)
    assert r32(v, V.GSTS) == 0
    assert v.translate(0x18, 0x1234, True) == 0x1234        # translation still off


def test_the_device_refuses_other_sizes_and_alignments():
    """Called directly (not through a bus that cuts accesses first), the device takes only what
    QEMU's vtd_mem_ops ``.valid`` allows: naturally aligned 4 or 8 bytes inside the page."""
    v, _, _ = vtd()
    assert v.read(V.VER, 1) == 0 and v.read(V.CAP, 2) == 0
    assert v.read(V.CAP + 4, 8) == 0                                  # 8 bytes, 4-aligned
    assert v.read(0xFFC, 8) == 0 and v.read(V.SIZE, 4) == 0 and v.read(-4, 4) == 0
    assert v.read(V.VER, 0) == 0 and v.read(V.VER, 3) == 0
    w32(v, V.FEDATA, 0x1234)
    v.write(V.FEDATA, 1, 0x99)
    v.write(V.FEDATA + 1, 2, 0x9999)
    v.write(V.FEDATA, 8, (1 << 64) - 1)                               # 8 bytes, 4-aligned
    v.write(V.SIZE - 4, 8, (1 << 64) - 1)
    assert r32(v, V.FEDATA) == 0x1234 and r32(v, V.FECTL) == V.FECTL_IM


def test_other_sizes_and_alignments_read_zero_and_are_ignored():
    """Through the bus, which cuts an access into naturally aligned pieces of at most 8 bytes as
    QEMU's memory core does (``memory_access_size``), before the device checks each piece."""
    v, _, _ = vtd()
    bus = mmio(v)
    assert bus.read(V.BASE + V.VER, 1) == 0 and bus.read(V.BASE + V.CAP, 2) == 0
    # 8 bytes, 4-aligned: two 4-byte pieces, CAP's high half and ECAP's low half
    assert bus.read(V.BASE + V.CAP + 4, 8) == (V.CAP_VALUE >> 32) | (V.ECAP_VALUE & 0xFFFFFFFF) << 32
    # the page's last word (0), then 4 bytes past the page that nothing decodes (all-ones)
    assert bus.read(V.BASE + 0xFFC, 8) == 0xFFFFFFFF << 32 and bus.unassigned == {V.BASE + V.SIZE: 1}
    w32(v, V.FEDATA, 0x1234)
    bus.write(V.BASE + V.FEDATA, 1, 0x99)
    bus.write(V.BASE + V.FEDATA + 1, 2, 0x9999)
    bus.write(V.BASE + V.FEDATA + 1, 4, 0x99999999)                   # 1 + 2 + 1-byte pieces
    assert r32(v, V.FEDATA) == 0x1234
    w64(v, V.FECTL, 0xFFFFFFFF_FFFFFFFF)            # 8 bytes: FECTL and FEDATA
    assert r32(v, V.FECTL) == V.FECTL_IM and r32(v, V.FEDATA) == 0xFFFF   # IP stays RO


def test_fsts_bits_are_rw1c_or_read_only():
    v, _, _ = vtd()
    w32(v, V.FSTS, 0xFFFFFFFF)
    assert r32(v, V.FSTS) == 0                     # nothing to clear, nothing set by software
    w32(v, V.ICS, 1)
    assert r32(v, V.ICS) == 0


# -- DMA remapping faults ---------------------------------------------------------------------
def tables(mem, v, *, devfn=0x18, root=0x1000, ctx=0x2000, l3=0x3000):
    mem.write(root, struct.pack("<QQ", ctx | 1, 0))
    mem.write(ctx + devfn * 16, struct.pack("<QQ", l3 | 1, 1))
    w64(v, V.RTADDR, root)
    w32(v, V.GCMD, V.GCMD_SRTP)
    w32(v, V.GCMD, V.GCMD_TE)


@pytest.mark.parametrize("root", BAD_PAGES)
def test_root_table_outside_ram_is_recorded_reason_8(root):
    v, mem, sent = vtd()
    enable_fault_events(v)
    w64(v, V.RTADDR, root)
    w32(v, V.GCMD, V.GCMD_SRTP)
    w32(v, V.GCMD, V.GCMD_TE)
    with pytest.raises(V.DmaFault):
        v.translate(0x18, 0x5000, False)
    fsts = r32(v, V.FSTS)
    assert fsts & V.FSTS_PPF and (fsts >> 8) & 0xFF == 0
    assert v.fault_records() == [(0, 0x18, 8, 0x5000, True)]
    hi = r64(v, V.FRO + 8)
    assert hi >> 63 and (hi >> 32) & 0xFF == 8 and hi & 0xFFFF == 0x18 and hi >> 62 & 1
    assert sent == [(0xFEE00000, 0x4E)]


@pytest.mark.parametrize("bad,reason", [("ctx", 9), ("l3", 7), ("noroot", 1), ("noctx", 2),
                                        ("write", 5), ("read", 6), ("aw", 3), ("tt", 3),
                                        ("rsvd_root", 0xA), ("rsvd_ctx", 0xB), ("beyond", 4)])
def test_dma_fault_reasons(bad, reason):
    v, mem, sent = vtd()
    tables(mem, v)
    ctx_ptr = {"ctx": RAM_END + 0x1000, "noroot": 0}.get(bad, 0x2000)
    mem.write(0x1000, struct.pack("<QQ", ctx_ptr | (0 if bad == "noroot" else 1),
                                  1 if bad == "rsvd_root" else 0))
    l3 = 0xFEE00000 if bad == "l3" else 0x3000
    ctx_lo = (l3 | (0 if bad == "noctx" else 1) | (1 << 2 if bad == "tt" else 0)
              | (1 << 4 if bad == "rsvd_ctx" else 0))
    mem.write(0x2000 + 0x18 * 16, struct.pack("<QQ", ctx_lo, 2 if bad == "aw" else 1))
    mem.write(0x3000, struct.pack("<Q", 0x4000 | 3))
    mem.write(0x4000, struct.pack("<Q", 0x5000 | 3))
    mem.write(0x5000, struct.pack("<Q", 0x6000 | (2 if bad == "read" else 1)))
    addr = 1 << 40 if bad == "beyond" else 0x123
    with pytest.raises(V.DmaFault) as e:
        v.translate(0x18, addr, bad == "write")
    assert e.value.reason == reason
    assert [rec[2] for rec in v.fault_records()] == [reason]
    assert r32(v, V.FECTL) == V.FECTL_IM | V.FECTL_IP and not sent    # masked: pending


def test_fault_records_fill_overflow_and_clear():
    v, mem, sent = vtd()
    enable_fault_events(v)
    w64(v, V.RTADDR, RAM_END)
    w32(v, V.GCMD, V.GCMD_SRTP | V.GCMD_TE)
    for i in range(V.NFR + 2):
        with pytest.raises(V.DmaFault):
            v.translate(i, i << 12, True)
    assert len(v.fault_records()) == V.NFR and r32(v, V.FSTS) & V.FSTS_PFO
    assert len(sent) == 1                           # one event for the first condition
    for i in range(V.NFR):                          # W1C the F bits (32-bit, high dword)
        w32(v, V.FRO + 16 * i + 12, 1 << 31)
    assert r32(v, V.FSTS) & 0xFF == V.FSTS_PFO
    w32(v, V.FSTS, V.FSTS_PFO)
    assert r32(v, V.FSTS) == 0
    with pytest.raises(V.DmaFault):
        v.translate(0x18, 0, False)
    assert len(sent) == 2 and len(v.fault_records()) == 1


def test_masked_fault_event_is_sent_when_unmasked():
    v, mem, sent = vtd()
    w32(v, V.FEDATA, 0x4E)
    w32(v, V.FEADDR, 0xFEE00000)
    w64(v, V.RTADDR, 0xFED90000)                    # the IOMMU's own registers
    w32(v, V.GCMD, V.GCMD_SRTP | V.GCMD_TE)
    with pytest.raises(V.DmaFault):
        v.translate(1, 0, False)
    assert not sent and r32(v, V.FECTL) & V.FECTL_IP
    w32(v, V.FECTL, 0)
    assert sent == [(0xFEE00000, 0x4E)] and r32(v, V.FECTL) == 0


# -- queued invalidation --------------------------------------------------------------------
def qi(v, iqa):
    w64(v, V.IQA, iqa)
    w32(v, V.GCMD, V.GCMD_QIE)


@pytest.mark.parametrize("iqa", BAD_PAGES)
def test_queue_outside_ram_sets_iqe(iqa):
    v, mem, sent = vtd()
    enable_fault_events(v)
    qi(v, iqa & ~0xFFF)
    w64(v, V.IQT, 16)
    assert r32(v, V.FSTS) == V.FSTS_IQE and r64(v, V.IQH) == 0
    assert sent == [(0xFEE00000, 0x4E)]
    w64(v, V.IQT, 32)                               # halted until IQE is cleared
    assert r64(v, V.IQH) == 0 and len(sent) == 1


def test_queue_crossing_the_end_of_ram_stops_at_the_first_bad_descriptor():
    mem, steps = Mem(), []
    v = V.Vtd(mem, signal_msi=lambda a, d: None, defer=lambda ns, fn: steps.append(fn))
    base = RAM_END - 0x1000
    qi(v, base | 1)                                 # 512 entries: 256..511 lie past RAM
    mem.write(base, struct.pack("<QQ", 4, 0) * 255 + struct.pack("<QQ", 5 | 1 << 5 | 0x77 << 32,
                                                                   0x8000))
    w64(v, V.IQT, 300 << 4)
    while steps:                                    # the queue's later steps (timer thread)
        steps.pop(0)()
    assert mem.read(0x8000, 4) == struct.pack("<I", 0x77)
    assert r32(v, V.FSTS) == V.FSTS_IQE and r64(v, V.IQH) == 256 << 4


@pytest.mark.parametrize("desc", [(3, 0), (6, 0), (7, 0), (0, 0), (1 << 9 | 1, 0),
                                  (5 | 1 << 8, 0), (5 | 1 << 5, 1), (2 | 1 << 40, 0),
                                  (5 | 1 << 5, RAM_END), (5 | 1 << 5, RAM_END - 2),
                                  (5 | 1 << 5, V.BASE + V.GCMD),
                                  (5 | 1 << 5, 0xFEE000B0), (5 | 1 << 5, (1 << 64) - 4)])
def test_invalid_descriptors_set_iqe_with_iqh_at_them(desc):
    v, mem, _ = vtd()
    qi(v, 0x10000)
    mem.write(0x10000, struct.pack("<QQ", 5 | 1 << 4, 0))        # a good wait descriptor
    mem.write(0x10010, struct.pack("<QQ", *desc))
    w64(v, V.IQT, 2 << 4)
    assert r32(v, V.FSTS) == V.FSTS_IQE and r64(v, V.IQH) == 1 << 4
    assert r32(v, V.ICS) == 1
    # software fixes the descriptor, clears IQE and writes the tail again
    mem.write(0x10010, struct.pack("<QQ", 4, 0))
    w32(v, V.FSTS, V.FSTS_IQE)
    w64(v, V.IQT, 2 << 4)
    assert r32(v, V.FSTS) == 0 and r64(v, V.IQH) == 2 << 4


def test_tail_beyond_the_queue_is_iqe():
    v, _, _ = vtd()
    qi(v, 0x10000)                                  # 256 entries: QT 0..255
    w64(v, V.IQT, 0x7FFF0)
    assert r32(v, V.FSTS) == V.FSTS_IQE


def test_wait_descriptor_completion_event():
    v, mem, sent = vtd()
    w32(v, V.IEDATA, 0x51)
    w32(v, V.IEADDR, 0xFEE00000)
    qi(v, 0x10000)
    mem.write(0x10000, struct.pack("<QQ", 5 | 1 << 4, 0))
    w64(v, V.IQT, 16)
    assert r32(v, V.ICS) == 1 and r32(v, V.IECTL) == V.FECTL_IM | V.FECTL_IP and not sent
    w32(v, V.IECTL, 0)
    assert sent == [(0xFEE00000, 0x51)] and r32(v, V.IECTL) == 0


# -- interrupt remapping --------------------------------------------------------------------
def ir(v, irta):
    w64(v, V.IRTA, irta)
    w32(v, V.GCMD, V.GCMD_SIRTP)
    w32(v, V.GCMD, V.GCMD_IRE)


@pytest.mark.parametrize("irta,handle,reason", [(RAM_END | 7, 3, 0x23), (0xFEE00000, 0, 0x23),
                                                 (((1 << 64) - 4096) | 0xF, 5, 0x23),
                                                 (0x6000 | 1, 4, 0x21), (0x6000 | 3, 1, 0x22),
                                                 (0x6000 | 3, 2, 0x24), (0x6000 | 3, 6, 0x26)])
def test_interrupt_remapping_faults_are_recorded_and_block(irta, handle, reason):
    v, mem, sent = vtd()
    mem.write(0x6000 + 2 * 16, struct.pack("<QQ", 1 | 0x41 << 16 | 0xF << 24, 0))
    mem.write(0x6000 + 6 * 16, struct.pack("<QQ", 1 | 0x42 << 16, 1 << 18 | 0x0100))
    ir(v, irta)
    v.deliver_msi(0xFEE00000 | 1 << 4 | handle << 5, 0, 0x18)
    assert not sent
    assert v.fault_records() == [(0, 0x18, reason, handle << 48, False)]


def test_irte_source_id_check_and_fpd():
    v, mem, sent = vtd()
    mem.write(0x6000, struct.pack("<QQ", 1 | 0x42 << 16, 1 << 18 | 0x18))   # SVT 1: 00:03.0
    mem.write(0x6010, struct.pack("<QQ", 2, 0))                             # FPD, not present
    ir(v, 0x6000 | 3)
    v.deliver_msi(0xFEE00000 | 1 << 4, 0, 0x18)
    v.deliver_msi(0xFEE00000 | 1 << 4 | 1 << 5, 0, 0x18)
    assert sent == [(0xFEE00000, 0x42)] and v.fault_records() == [] and v.ir_faults == 1


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 0x2C0 // 4).map(lambda x: x * 4),
                              st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
                    max_size=40),
       addrs=st.lists(st.sampled_from(BAD_ADDRS + [0, 0x1000, 0x7000]), min_size=4, max_size=4),
       msi=st.integers(0, (1 << 32) - 1), data=st.integers(0, (1 << 32) - 1))
def test_hostile_programming_never_raises(ops, addrs, msi, data):
    v, mem, _ = vtd()
    mem.write(0x1000, bytes(range(256)) * 16)
    w64(v, V.RTADDR, addrs[0])
    w64(v, V.IQA, addrs[1])
    w64(v, V.IRTA, addrs[2] | 0xF)
    w32(v, V.GCMD, V.GCMD_SRTP | V.GCMD_SIRTP)
    w32(v, V.GCMD, V.GCMD_TE | V.GCMD_QIE | V.GCMD_IRE)
    for off, size, value in ops:
        mmio(v).write(V.BASE + off, size, value & ((1 << 8 * size) - 1))
        mmio(v).read(V.BASE + off, size)
        assert r64(v, V.CAP) == V.CAP_VALUE and r64(v, V.ECAP) == V.ECAP_VALUE
    for sid in (0, 0x18, 0xFFFF):
        try:
            v.translate(sid, addrs[3] | msi, bool(data & 1))
        except V.DmaFault:
            pass
        v.deliver_msi(0xFEE00000 | (msi & 0xFFFFF), data, sid)
    assert len(v.fault_records()) <= V.NFR


# -- edu --------------------------------------------------------------------------------------
BAR = 0xFEA00000


def edu(translate=None):
    mem, msis, intx = Mem(), [], []
    e = Edu(bdf=0x18, bar=BAR, intx_line=11, memory=mem, msi=lambda s, a, d: msis.append((s, a, d)),
            set_intx=intx.append, translate=translate)
    e.pci.write(0x04, 2, 0x06)
    return e, mem, msis, intx


def ew(e, off, v, n=4):
    mmio(e).write(BAR + off, n, v & ((1 << 8 * n) - 1))


def er(e, off, n=4):
    return mmio(e).read(BAR + off, n)


def test_edu_device_refuses_other_sizes_and_alignments_as_qemu():
    """Called directly (not through a bus that cuts accesses first), the device takes only what
    QEMU's edu_mmio_ops ``.valid`` allows (naturally aligned 4 or 8 bytes) and reads 0 else."""
    e, _, _, _ = edu()
    ew(e, 4, 0x1234)
    for off, n in ((4, 1), (5, 1), (4, 2), (6, 2), (5, 4), (4, 8), (0x81, 4), (0x84, 8)):
        e.write(off, n, 0xFFFFFFFF)
    assert er(e, 4) == ~0x1234 & 0xFFFFFFFF and er(e, 0x88, 8) == 0
    assert e.read(4, 1) == 0 and e.read(5, 4) == 0 and e.read(0x84, 8) == 0    # invalid: 0
    assert e.read(0, 0) == 0 and e.read(0x80, 3) == 0


def test_edu_ignores_other_sizes_and_alignments_as_qemu():
    """Through the bus, which cuts an access into naturally aligned pieces of at most 8 bytes as
    QEMU's memory core does, before the device checks each piece."""
    e, _, _, _ = edu()
    ew(e, 4, 0x1234)
    for off, n in ((4, 1), (5, 1), (4, 2), (6, 2), (5, 4), (0x81, 4)):
        ew(e, off, 0xFFFFFFFF, n)                    # pieces of 1 and 2 bytes: ignored
    assert er(e, 4) == ~0x1234 & 0xFFFFFFFF
    assert er(e, 4, 1) == 0 and er(e, 5, 4) == 0                                # invalid: 0
    ew(e, 4, 3 << 32 | 0x4321, 8)                    # 4-aligned: liveness, then factorial 3
    assert er(e, 4) == ~0x4321 & 0xFFFFFFFF and er(e, 8) == 6
    ew(e, 0x84, 0x5000 << 32 | 0xAAAA, 8)            # 0x84 (no register), then DMA dst low
    assert er(e, 0x84, 8) == 0x5000 << 32 | 0xFFFFFFFF and er(e, 0x88, 8) == 0x5000
    assert er(e, 0, 8) == (1 << 64) - 1 and er(e, 0x10) == 0xFFFFFFFF          # no register
    ew(e, 0, 5)
    assert er(e, 0) == 0x010000ED
    ew(e, 0x80, 0x1122334455667788, 8)
    ew(e, 0x84, 0xAAAA)                              # no register at 0x84 in QEMU's edu
    assert er(e, 0x80, 8) == 0x1122334455667788 and er(e, 0x84) == 0xFFFFFFFF
    assert er(e, DMA_START) == 0xFFFFFFFF           # the buffer is not in the BAR
    ew(e, 0x98, 6)                                   # no start bit: ignored
    assert er(e, 0x98) == 0


@pytest.mark.parametrize("addr", BAD_ADDRS + [0x10000000 - 2])
def test_edu_dma_to_bad_addresses_completes_against_unassigned_memory(addr):
    e, mem, msis, intx = edu()
    mem.write(0, b"\x5a" * 16)
    ew(e, 0x80, addr, 8), ew(e, 0x88, DMA_START, 8), ew(e, 0x90, 16, 8), ew(e, 0x98, 1 | 4)
    assert er(e, 0x98) == 4 and er(e, 0x24) == 0x100 and intx == [1]
    ew(e, 0x80, DMA_START, 8), ew(e, 0x88, addr, 8), ew(e, 0x98, 1 | 2)
    assert er(e, 0x98) == 2


def test_edu_dma_through_a_faulting_iommu_reads_zeros():
    v, mem, _ = vtd()
    w64(v, V.RTADDR, RAM_END)                        # root table not in RAM: every DMA faults
    w32(v, V.GCMD, V.GCMD_SRTP | V.GCMD_TE)
    e = Edu(bdf=0x18, bar=BAR, intx_line=11, memory=mem, msi=lambda *a: None,
            set_intx=lambda level: None, translate=v.translate)
    e.pci.write(0x04, 2, 0x06)
    e.buffer[:4] = b"abcd"
    mem.write(0x3000, b"wxyz")
    ew(e, 0x80, 0x3000, 8), ew(e, 0x88, DMA_START, 8), ew(e, 0x90, 4, 8), ew(e, 0x98, 1)
    assert bytes(e.buffer[:4]) == bytes(4) and e.dma_errors == 1
    assert [r[2] for r in v.fault_records()] == [8]


def test_edu_without_bus_master_neither_dmas_nor_sends_msi():
    e, mem, msis, intx = edu()
    e.pci.write(0x04, 2, 0x02)
    mem.write(0x3000, b"wxyz")
    ew(e, 0x80, 0x3000, 8), ew(e, 0x88, DMA_START, 8), ew(e, 0x90, 4, 8), ew(e, 0x98, 1)
    assert bytes(e.buffer[:4]) == bytes(4)
    e.pci.write(0x44, 4, 0xFEE00000), e.pci.write(0x42, 1, 1)
    ew(e, 0x60, 1)
    assert msis == []


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from([0, 4, 8, 0x20, 0x24, 0x60, 0x64, 0x80, 0x84,
                                               0x88, 0x90, 0x98, 0x9C, 0x1000, DMA_START]),
                              st.integers(0, 7), st.sampled_from([1, 2, 4, 8]),
                              st.integers(0, (1 << 64) - 1)), max_size=30))
def test_edu_hostile_programming_never_raises(ops):
    e, _, _, _ = edu()
    for off, skew, n, value in ops:
        ew(e, off + skew, value, n)
        er(e, off + skew, n)
        assert er(e, 0) == 0x010000ED


# -- PCI configuration mechanism #1 --------------------------------------------------------


def test_pci_read_only_fields_hold_for_every_width_and_alignment():
    host = PciHost()
    h = pio(host)
    before = {k: bytes(f.config) for k, f in host.functions.items()}
    for dev, fn in list(host.functions) + [(5, 0), (1, 7)]:
        for reg in range(0, 256, 4):
            for low in range(4):
                h.write(0xCF8, 4, 0x80000000 | dev << 11 | fn << 8 | reg | low)
                for port in range(0xCFC, 0xD00):
                    for size in (1, 2, 4):
                        h.write(port, size, 0xFFFFFFFF)
                        h.read(port, size)
    for k, f in host.functions.items():
        for off in (0, 1, 2, 3, 8, 9, 10, 11, 0x0E, 0x2C, 0x2D, 0x2E, 0x2F, 0x34):
            assert f.config[off] == before[k][off], (k, off)


def test_pci_absent_functions_and_crossing_accesses():
    h = pio(PciHost())
    h.write(0xCF8, 4, 0x80000000 | 7 << 11)
    assert h.read(0xCFC, 4) == 0xFFFFFFFF and h.read(0xCFE, 2) == 0xFFFF
    h.write(0xCF8, 4, 0x80000000)
    assert h.read(0xCFC, 4) == 0x12378086
    # QEMU's pci_host data port takes naturally aligned accesses only: others read 0
    assert h.read(0xCFD, 4) == 0 and h.read(0xCFE, 4) == 0 and h.read(0xCFD, 2) == 0
    assert h.read(0xCFE, 2) == 0x1237 and h.read(0xCFD, 1) == 0x80
    h.write(0xCF8, 2, 0)                            # only 32-bit writes reach CONFIG_ADDRESS
    assert h.read(0xCF8, 4) == 0x80000000 and h.read(0xCF8, 2) == 0x0000
