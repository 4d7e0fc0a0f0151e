"""Issue 10 (what kvm-unit-tests' intel_iommu test needs): QEMU's edu PCI device and a VT-d
IOMMU on the PC machine (``pc_device`` options, ``pykvm run --pc-device``), driven by
pc_iommu.c (beside this file)."""
import pytest

pytestmark = pytest.mark.requires_arch("x86_64")


def test_edu_dma_and_interrupts_through_vtd(guest_vm):
    m = guest_vm("pc_iommu.c", devices=("edu", "intel-iommu"))
    assert m.platform.name == "pc"                 # devices make a PC
    devfn, bar, size, ident, alive, fact = m.sync(stage=1)
    assert (devfn, bar, size) == (3 << 3, 0xFEA00000, 0xFFF00000)    # 1 MiB BAR, as assigned
    assert (ident, alive, fact) == (0x010000ED, 0xEDCBA987, 120)
    same, version = m.sync(stage=2)
    assert same == 16 and version == 0x10             # untranslated DMA; VT-d 1.0
    remapped, fsts, untouched = m.sync(stage=3)
    assert remapped == 0xA5A50000                     # DMA to IOVA 0x200000 landed on its page
    assert fsts & 0x2 and untouched == 0x11111111     # an unmapped IOVA faults, nothing written
    assert m.platform.vtd.faults == 1 and m.platform.edu.dma_errors == 1
    compat, remapped_msi, intx = m.sync(stage=4)
    assert (compat, remapped_msi, intx) == (1, 1, 1)  # MSI, MSI through an IRTE, INTx
    m.done()


def test_unknown_pc_device_is_refused(guest_vm):
    with pytest.raises(ValueError, match="no PC device"):
        guest_vm("pc_fwcfg.c", devices=("floppy",))
