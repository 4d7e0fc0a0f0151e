"""Issue 16, faults 1 and 2 on real KVM: a guest (pc_vtd_faults.c, beside this file) programs the
VT-d IOMMU with an invalidation queue on the LAPIC page, a root table past the end of RAM and an
interrupt remapping table at 2^64 - 4096, and writes all-ones over read-only registers with
narrow and unaligned stores. The IOMMU reports each fault as the VT-d spec says (FSTS.IQE, fault
recording registers with reasons 8 and 0x23, the fault event MSI) and the guest runs to the end
with status 0."""
import pytest

from pykvm.devices import vtd as V

pytestmark = pytest.mark.requires_arch("x86_64")


def test_guest_sees_vtd_faults_and_runs_on(guest_vm):
    m = guest_vm("pc_vtd_faults.c", devices=("edu", "intel-iommu"))
    fsts, iqh, events = m.sync(stage=1)
    assert fsts == V.FSTS_IQE and iqh == 0 and events == 1       # queue fetch error at IQH 0
    fsts, rec_hi, rec_lo, events, cmd = m.sync(stage=2)
    assert fsts == V.FSTS_PPF                                    # FRI 0
    assert rec_hi == (1 << 31) | 8 and rec_lo == 0x5000          # F, write, reason 8
    assert events == 2 and cmd == 2                              # the DMA still completed
    fsts, rec_hi, info, events, msis = m.sync(stage=3)
    assert fsts == V.FSTS_PPF and rec_hi == (1 << 31) | 0x23 and info == 9 << 48
    assert events == 2 and msis == 0                             # PPF pending: no new event
    ver, cap_lo, cap_hi, gsts, fsts = m.sync(stage=4)
    assert (ver, cap_lo | cap_hi << 32) == (0x10, V.CAP_VALUE)
    assert gsts == (V.GSTS_TES | V.GSTS_RTPS | V.GSTS_QIES | V.GSTS_IRES | V.GSTS_IRTPS)
    assert fsts == 0
    pcm = m.platform
    assert pcm.vtd.faults == 1 and pcm.vtd.ir_faults == 1 and pcm.edu.dma_errors == 1
    m.done()
