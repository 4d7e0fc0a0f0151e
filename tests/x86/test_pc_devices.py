"""Issue 10: the PC machine's fw_cfg, PCI configuration space and pc-testdev, each seen by a
guest of our own (pc_*.c, beside this file) on this host's /dev/kvm."""
import pytest

pytestmark = pytest.mark.requires_arch("x86_64")

QEMU = int.from_bytes(b"QEMU", "little")


@pytest.mark.parametrize("vcpus,mem", [(1, 64 << 20), (3, 256 << 20)])
def test_fw_cfg_items(guest_vm, vcpus, mem):
    m = guest_vm("pc_fwcfg.c", machine="pc", vcpus=vcpus, mem_size=mem)
    sig, ident, ram, cpus, max_cpus = m.sync(stage=1)
    assert (sig, ident, ram, cpus, max_cpus) == (QEMU, 1, mem, vcpus, vcpus)
    unknown, past_end, again, wide = m.sync(stage=2)
    assert unknown == 0 and past_end == 0             # unknown keys and past the end: zeros
    assert again == QEMU                              # selecting a key rewinds it
    assert wide == 0                                  # QEMU 7.2: a 16-bit read is not valid
    m.done()


def test_pci_host_bridge_is_i440fx_and_absent_functions_read_ones(guest_vm):
    m = guest_vm("pc_pci.c", machine="pc")
    host_id, class_rev, hdr, isa_id, isa_hdr, pm_id, pmba = m.sync(stage=1)
    assert host_id == 0x1237_8086                     # 00:00.0 Intel 82441FX (i440FX)
    assert class_rev == 0x0600_0002                   # host bridge, revision 2
    assert hdr == 0x00
    assert isa_id == 0x7000_8086 and isa_hdr == 0x80  # PIIX3 ISA bridge, multi-function
    assert pm_id == 0x7113_8086 and pmba == 0x601     # PIIX4 PM, PM base 0x600 (I/O space)
    absent, bus1, disabled, dev16, class8 = m.sync(stage=2)
    assert absent == bus1 == disabled == 0xFFFF_FFFF
    assert dev16 == 0x1237 and class8 == 0x06         # sub-dword accesses at 0xcfe / 0xcff
    irq_line, vendor_after_write, addr_reg, absent_after_write = m.sync(stage=3)
    assert irq_line == 0x5A                           # writable
    assert vendor_after_write == 0x1237_8086          # read-only
    assert addr_reg == 0x8000_0000 | (1 << 11) | (3 << 8) | 0x40     # 0xcf8 reads back
    assert absent_after_write == 0xFFFF_FFFF
    m.done()


def test_pc_testdev_scratch_ports_iomem_and_irq_lines(guest_vm):
    m = guest_vm("pc_testdev.c", machine="pc")
    wide, packed, hi, byte_view, last, insb = m.sync(stage=1)
    assert wide == packed == 0x1122_3344              # a write is read back, at any width
    assert hi == 0x1122
    # 0xe8-0xeb view the same register a byte at a time; 0xe9 stays pykvm's debug console
    assert byte_view & 0xFFFF_00FF == 0x1122_0044
    assert last == ord("h")                           # the last byte of a rep outsb
    assert insb == 0x5A5A_5A5A                        # rep insb reads the register each time
    assert m.sync(stage=2) == (0xCAFE_F00D, 0x0123_4567_89AB_CDEF, 0x77)   # MMIO window
    hits, vector = m.sync(stage=3)
    assert (hits, vector) == (1, 0x76)                # ISA IRQ 14 through the IOAPIC, once
    m.done()
    assert m.platform.testdev.iomem[0x100:0x104] == (0xCAFE_F00D).to_bytes(4, "little")
