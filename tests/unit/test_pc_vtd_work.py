"""Issue 16, fault 3, without KVM: every guest access to the VT-d IOMMU and the edu device costs
the host bounded work, counted here in descriptors consumed and guest-memory operations (never
in wall-clock time).

Queued invalidation (VT-d spec 6.5.2) is asynchronous on hardware: an IQT write consumes at most
:data:`~pykvm.devices.vtd.IQ_BATCH` descriptors, the rest follow in steps the IOMMU asks its
``defer`` handle for (the pc machine's timer thread), one step pending at a time, each at most a
batch and :data:`~pykvm.devices.vtd.IQ_STEP_NS` after the last; software sees completion through
the wait descriptors' status writes, ICS.IWC and IQH. DMA translation and interrupt remapping
read a fixed number of table entries whatever the guest programmed; edu's DMA moves at most its
4 KiB buffer whatever DMA count is written."""
import struct

from hypothesis import given, settings, strategies as st

from pykvm.devices import vtd as V
from pykvm.devices.edu import DMA_START, Edu
from pykvm.errors import GuestMemoryError

from device_buses import mmio

RAM = 4 << 20
QUEUE = 0x100000                    # 32768 descriptors: [1 MiB, 1.5 MiB)
STATUS = 0x200000                   # one status word per descriptor
ENTRIES = 256 << 7


class CountingMem:
    """One RAM slot [0, 4 MiB) that counts reads and writes; anything else raises
    GuestMemoryError before changing anything, as GuestMemory does."""

    def __init__(self):
        self.buf = bytearray(RAM)
        self.reads = self.writes = 0

    def _check(self, gpa, n):
        if gpa < 0 or n < 0 or gpa + n > RAM:
            raise GuestMemoryError(f"{gpa:#x}+{n:#x} is not RAM")

    def read(self, gpa, n):
        self.reads += 1
        self._check(gpa, n)
        return bytes(self.buf[gpa:gpa + n])

    def write(self, gpa, data):
        self.writes += 1
        self._check(gpa, len(data))
        self.buf[gpa:gpa + len(data)] = data


class Deferred:
    """The ``defer`` handle, driven by hand: records (delay_ns, fn) and runs one when told."""

    def __init__(self):
        self.pending = []
        self.delays = []

    def __call__(self, delay_ns, fn):
        self.pending.append(fn)
        self.delays.append(delay_ns)

    def run_one(self):
        self.pending.pop(0)()


def w32(v, off, val):
    mmio(v).write(V.BASE + off, 4, val & 0xFFFFFFFF)


def w64(v, off, val):
    mmio(v).write(V.BASE + off, 8, val & (1 << 64) - 1)


def r32(v, off):
    return mmio(v).read(V.BASE + off, 4)


def r64(v, off):
    return mmio(v).read(V.BASE + off, 8)


def full_queue(defer=None):
    """A VT-d with a 32768-entry queue of wait descriptors (SW, status data i + 1 at
    STATUS + 4 i; IF on the last) and QIE on."""
    mem, sent = CountingMem(), []
    v = V.Vtd(mem, signal_msi=lambda a, d: sent.append((a, d)), defer=defer)
    descs = b"".join(struct.pack("<QQ", 5 | 1 << 5 | (i + 1) << 32 | (1 << 4 if i == ENTRIES - 1
                                                                       else 0), STATUS + 4 * i)
                     for i in range(ENTRIES))
    mem.write(QUEUE, descs)
    w64(v, V.IQA, QUEUE | 7)
    w32(v, V.GCMD, V.GCMD_QIE)
    mem.reads = mem.writes = 0
    return v, mem, sent


def statuses(mem):
    return struct.unpack(f"<{ENTRIES}I", mem.buf[STATUS:STATUS + 4 * ENTRIES])


def test_an_iqt_write_consumes_at_most_a_batch_and_the_rest_follows_in_steps():
    d = Deferred()
    v, mem, _ = full_queue(d)
    w64(v, V.IQT, (ENTRIES - 1) << 4)
    assert v.iq_fetched == V.IQ_BATCH and r64(v, V.IQH) == V.IQ_BATCH << 4
    assert sum(1 for s in statuses(mem) if s) == V.IQ_BATCH
    assert mem.reads == 1 and mem.writes == V.IQ_BATCH      # one read for the run
    assert len(d.pending) == 1 and d.delays == [V.IQ_STEP_NS]
    for _ in range(5):                              # more IQT writes only move the tail
        w64(v, V.IQT, (ENTRIES - 1) << 4)
    assert v.iq_fetched == V.IQ_BATCH and len(d.pending) == 1
    steps = 0
    while d.pending:
        before, reads = v.iq_fetched, mem.reads
        d.run_one()
        steps += 1
        assert v.iq_fetched - before <= V.IQ_BATCH and mem.reads - reads == 1
        assert len(d.pending) <= 1                  # one step pending at a time
        assert r64(v, V.IQH) == v.iq_fetched << 4   # IQH advances as descriptors are consumed
    assert steps == -(-(ENTRIES - 1 - V.IQ_BATCH) // V.IQ_BATCH) == v.iq_deferred_steps
    assert set(d.delays) == {V.IQ_STEP_NS}
    assert statuses(mem)[:-1] == tuple(range(1, ENTRIES)) and statuses(mem)[-1] == 0
    assert r64(v, V.IQH) == (ENTRIES - 1) << 4 and r32(v, V.ICS) == 0 and r32(v, V.FSTS) == 0
    w64(v, V.IQT, 0)                                # the last one, wrapping: its IF sets IWC
    assert statuses(mem)[-1] == ENTRIES and r64(v, V.IQH) == 0 and r32(v, V.ICS) == V.ICS_IWC
    assert not d.pending and v.iq_sync_max == V.IQ_BATCH


def test_the_hostile_sweep_costs_a_batch_per_write_and_completes():
    """The reproducer: IQT swept 20 times between 32767 and 0 over the full queue."""
    d = Deferred()
    v, mem, _ = full_queue(d)
    for _ in range(20):
        for tail in (ENTRIES - 1, 0):
            before, reads, writes = v.iq_fetched, mem.reads, mem.writes
            w64(v, V.IQT, tail << 4)
            assert v.iq_fetched - before <= V.IQ_BATCH
            assert mem.reads - reads <= 2 and mem.writes - writes <= V.IQ_BATCH
    assert v.iq_fetched == V.IQ_BATCH and v.iq_sync_max == V.IQ_BATCH
    while d.pending:
        d.run_one()
    assert r64(v, V.IQH) == 0 and v.iq_fetched == ENTRIES
    assert statuses(mem) == tuple(range(1, ENTRIES + 1)) and r32(v, V.ICS) == V.ICS_IWC


def test_without_defer_each_iqt_write_moves_one_batch():
    v, mem, _ = full_queue(None)
    for k in range(1, 4):
        w64(v, V.IQT, (ENTRIES - 1) << 4)
        assert r64(v, V.IQH) == (k * V.IQ_BATCH) << 4 and v.iq_sync_max == V.IQ_BATCH


def test_a_queue_error_in_a_later_step_stops_the_steps():
    d = Deferred()
    v, mem, sent = full_queue(d)
    w32(v, V.FEDATA, 0x4E)
    w32(v, V.FEADDR, 0xFEE00000)
    w32(v, V.FECTL, 0)
    bad = V.IQ_BATCH * 2 + 5
    mem.write(QUEUE + 16 * bad, struct.pack("<QQ", 3, 0))     # device-TLB: unsupported
    w64(v, V.IQT, (ENTRIES - 1) << 4)
    while d.pending:
        d.run_one()
    assert r32(v, V.FSTS) == V.FSTS_IQE and r64(v, V.IQH) == bad << 4
    assert v.iq_fetched == bad and sent == [(0xFEE00000, 0x4E)]
    assert sum(1 for s in statuses(mem) if s) == bad


def test_a_queue_crossing_out_of_ram_costs_a_bounded_number_of_reads():
    """One read fails for the run; the step then reads one descriptor at a time, at most a
    batch, to find the first outside RAM."""
    mem, d = CountingMem(), Deferred()
    v = V.Vtd(mem, signal_msi=lambda a, d: None, defer=d)
    base = RAM - 0x1000                            # 512 entries: 256..511 lie past RAM
    mem.write(base, struct.pack("<QQ", 4, 0) * 256)
    w64(v, V.IQA, base | 1)
    w32(v, V.GCMD, V.GCMD_QIE)
    w64(v, V.IQT, 511 << 4)
    while d.pending:
        reads = mem.reads
        d.run_one()
        assert mem.reads - reads <= V.IQ_BATCH + 1
    assert r32(v, V.FSTS) == V.FSTS_IQE and r64(v, V.IQH) == 256 << 4


def test_turning_qi_off_drops_the_pending_work():
    d = Deferred()
    v, mem, _ = full_queue(d)
    w64(v, V.IQT, (ENTRIES - 1) << 4)
    w32(v, V.GCMD, 0)                               # QIE off: IQH back to 0
    d.run_one()
    assert v.iq_fetched == V.IQ_BATCH and not d.pending and r64(v, V.IQH) == 0
    v.reset()
    assert not d.pending


@settings(max_examples=200, deadline=None)
@given(root=st.integers(0, (1 << 64) - 1), sid=st.integers(0, 0xFFFF),
       addr=st.integers(0, (1 << 64) - 1), write=st.booleans(),
       table=st.binary(min_size=64, max_size=64))
def test_a_dma_translation_reads_at_most_five_table_entries(root, sid, addr, write, table):
    """Root entry, context entry and three paging levels (VT-d spec 3.4-3.7), whatever the
    tables hold."""
    mem = CountingMem()
    for off in range(0, 0x10000, 64):
        mem.buf[off:off + 64] = table
    v = V.Vtd(mem, signal_msi=lambda a, d: None)
    w64(v, V.RTADDR, root)
    w32(v, V.GCMD, V.GCMD_SRTP)
    w32(v, V.GCMD, V.GCMD_TE)
    mem.reads = mem.writes = 0
    try:
        v.translate(sid, addr, write)
    except V.DmaFault:
        pass
    assert mem.reads <= 5 and mem.writes == 0


@settings(max_examples=200, deadline=None)
@given(irta=st.integers(0, (1 << 64) - 1), address=st.integers(0, (1 << 64) - 1),
       data=st.integers(0, 0xFFFFFFFF), sid=st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_an_interrupt_remapping_reads_one_irte(irta, address, data, sid):
    mem = CountingMem()
    v = V.Vtd(mem, signal_msi=lambda a, d: None)
    w64(v, V.IRTA, irta)
    w32(v, V.GCMD, V.GCMD_SIRTP)
    w32(v, V.GCMD, V.GCMD_IRE)
    mem.reads = 0
    for _ in range(20):                             # faults past the 8 records: PFO, no scan
        v.deliver_msi(address | 1 << 4, data, sid)
    assert mem.reads <= 20 and len(v.fault_records()) <= V.NFR


@settings(max_examples=200, deadline=None)
@given(src=st.integers(0, (1 << 64) - 1), dst=st.integers(0, (1 << 64) - 1),
       count=st.one_of(st.integers(0, 0x2000), st.integers(0, (1 << 64) - 1)),
       cmd=st.integers(0, 7))
def test_edu_dma_touches_at_most_its_buffer_whatever_the_count(src, dst, count, cmd):
    """QEMU's edu moves at most its 4 KiB buffer: two pages, each one translation and one
    guest-memory operation."""
    mem = CountingMem()
    edu = Edu(bdf=3 << 3, bar=0xFEA00000, intx_line=11, memory=mem,
              msi=lambda *a: None, set_intx=lambda level: None)
    edu.pci.config[0x04] = 0x06                     # memory decoding, bus master
    bus = mmio(edu)
    for off, val in ((0x80, src), (0x88, dst), (0x90, count), (0x98, cmd | 1)):
        bus.write(0xFEA00000 + off, 8, val)
    assert mem.reads + mem.writes <= 2
    if cmd & 2 and DMA_START <= src and src - DMA_START + count <= 4096:
        assert mem.writes <= 2
