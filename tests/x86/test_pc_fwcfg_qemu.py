"""Issue 16, fault 6: QEMU's x86 fw_cfg as a guest sees it on this host's KVM — the 16-bit
selector (8- and 32-bit writes select nothing), 8-bit reads as data reads at both ports, invalid
widths reading 0, and the keys with bit 14 or 15 set (pc_fwcfg_qemu.c, beside this file). The values
are what qemu-system-x86_64 7.2 returned for the same accesses, except where pykvm differs by
design: 0x8003 is absent as in current QEMU (7.2 still served a legacy table), 0x8004 describes
no HPET (pykvm has none), and 0x514 has no DMA register (FW_CFG_ID bit 1 is clear)."""

import pytest

pytestmark = pytest.mark.requires_arch("x86_64")


def test_fw_cfg_selector_widths_and_arch_keys(guest_vm):
    mem = 256 << 20
    m = guest_vm("pc_fwcfg_qemu.c", machine="pc", mem_size=mem)
    b0, b1, b2, w, l, w511, b3 = m.sync(stage=1)  # noqa: E741 — b/w/l: access widths
    assert (b0, b1, b2) == (ord("E"), ord("M"), ord("U"))   # no selection by 8/32-bit writes
    assert (w, l) == (0, 0)                                  # invalid reads: 0, no advance
    assert w511 == 0                                         # QEMU 7.2: not valid, no advance
    assert b3 == ord("Q")                                    # 16-bit write at 0x511: no select
    ram, e820, irq0, hpet, acpi, past, invalid = m.sync(stage=2)
    assert ram == mem                                        # bit 14: the same item
    assert e820 == 0 and acpi == 0                           # absent items read 0
    assert irq0 == 1
    assert hpet == 0x00FF                                    # count 0xff: no HPET
    assert past == 0 and invalid == 0                        # keys past the table
    m.done()
