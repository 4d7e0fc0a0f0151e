"""Issue 10: ACPI tables, the PM timer and S3 sleep/resume on the PC machine, each exercised by a
guest of our own that walks the tables as an OS does."""
import pytest

from pykvm.platform import acpi

pytestmark = pytest.mark.requires_arch("x86_64")


def sig(text):
    return int.from_bytes(text.encode(), "little")


@pytest.mark.parametrize("vcpus", [1, 4])
def test_acpi_tables_checksums_and_content(guest_vm, vcpus):
    m = guest_vm("pc_acpi.c", machine="pc", vcpus=vcpus)
    rsdp, rev, sum20, sum36, rsdt, xsdt, oem = m.sync(stage=1)
    assert 0xE0000 <= rsdp < 0x100000 and rsdp % 16 == 0
    assert (rev, sum20, sum36) == (2, 0, 0)            # both RSDP checksums
    assert oem == int.from_bytes(acpi.OEM_ID, "little")
    tables = {}
    for stage, root, width in ((2, rsdt, 4), (3, xsdt, 8)):
        _, signature, addr, length, csum, trev = m.sync(stage=stage)
        assert (signature, addr, csum) == (sig("RSDT" if width == 4 else "XSDT"), root, 0)
        assert length == 36 + 2 * width
        for i in range(2):
            k, signature, addr, length, csum, trev = m.sync(stage=stage)
            assert k == i and csum == 0
            tables.setdefault(signature, set()).add((addr, length, trev))
    assert set(tables) == {sig("FACP"), sig("APIC")}
    assert all(len(v) == 1 for v in tables.values())   # RSDT and XSDT agree
    (fadt_len,) = [length for _, length, _ in tables[sig("FACP")]]
    assert fadt_len == 244 and list(tables[sig("FACP")])[0][2] == 3
    facs, xfacs, dsdt, xdsdt, pm1a_evt, pm1a_cnt, pm_tmr = m.sync(stage=4)
    assert facs == xfacs and facs % 64 == 0 and dsdt == xdsdt
    assert (pm1a_evt, pm1a_cnt, pm_tmr) == (0x600, 0x604, 0x608)
    sci, lens, flags, facs_sig, facs_len, dsdt_len, dsdt_sum = m.sync(stage=5)
    assert sci == 9 and lens == 4 | 2 << 8 | 4 << 16
    assert not flags & acpi.FADT_TMR_VAL_EXT            # a 24-bit PM timer
    assert (facs_sig, facs_len, dsdt_sum) == (sig("FACS"), 64, 0)
    overrides = [m.sync(stage=7) for _ in range(5)]
    assert [o[1:] for o in overrides] == [(0, 0, 2, 0), (0, 5, 5, 0xD), (0, 9, 9, 0xD),
                                          (0, 10, 10, 0xD), (0, 11, 11, 0xD)]
    lapic, madt_flags, n_lapic, mask, io_id, io_addr, gsi_base = m.sync(stage=6)
    assert (lapic, madt_flags) == (0xFEE00000, 1)
    assert n_lapic == vcpus and mask == (1 << vcpus) - 1
    assert (io_id, io_addr, gsi_base) == (0, 0xFEC00000, 0)
    nmis, nmi_uid, nmi_lint, s3 = m.sync(stage=8)
    assert (nmis, nmi_uid, nmi_lint) == (1, 0xFF, 1)
    # Name(_S3_, Package(4){One, One, Zero, Zero}): SLP_TYP 1
    assert s3.to_bytes(8, "little")[:7] == bytes([0x12, 0x06, 0x04, 0x01, 0x01, 0x00, 0x00])
    m.done()


def test_pm_timer_counts_at_3_579545_mhz(guest_vm):
    m = guest_vm("pc_pmtimer.c", machine="pc")
    m.set_params(3000, 1)
    first, last, ticks, outer, inner, max_step, reads = m.sync(stage=1)
    assert reads == 3000
    assert ticks > 0 and max_step < 1 << 23            # monotonic (checked read by read)
    assert (first + ticks) & 0xFFFFFF == last
    # the counted ticks at 3.579545 MHz span between `inner` and `outer` TSC cycles of the
    # vCPU's TSC frequency (one tick of rounding, 2 % for the kHz figure and the clocks' skew)
    tsc_hz = m.vcpus[0].tsc_khz() * 1000
    assert inner * 3_579_545 / (ticks + 1) < 1.02 * tsc_hz, (inner, ticks, tsc_hz)
    assert outer * 3_579_545 / max(ticks - 1, 1) > 0.98 * tsc_hz, (outer, ticks, tsc_hz)
    port, cnt, en, sts, en_low = m.sync(stage=2)
    assert port == 0x608
    assert cnt & 1 == 1                                # SCI_EN: always in ACPI mode
    assert en == 0x0401 and en_low == 0x01             # PM1_EN reads back, by word or byte
    assert sts == 0                                    # write-1-to-clear
    per_rtc_second = sorted(m.sync(stage=3))[1]       # the median of three RTC seconds
    assert 0.8 * 3_579_545 < per_rtc_second < 1.2 * 3_579_545   # ticks per RTC second
    m.done()


@pytest.mark.parametrize("alarm", [0, 1])
def test_s3_resumes_at_the_facs_waking_vector(guest_vm, alarm):
    m = guest_vm("pc_s3.c", machine="pc")
    m.set_params(alarm)
    facs, vector, cnt, evt, armed = m.sync(stage=1)
    assert (vector, cnt, evt, armed) == (0x8000, 0x604, 0x600, alarm)
    assert m.memory.read_u32(facs + acpi.FACS_WAKING_VECTOR) == 0x8000
    pm1_sts, cs, msw, marker = m.sync(stage=2)     # reported by the resume code, in real mode
    assert marker == 0x53335353
    assert cs == 0x800 and msw & 1 == 0               # CS:IP = 0800:0000, CR0.PE clear
    assert pm1_sts & 0x8000                           # WAK_STS
    assert bool(pm1_sts & 0x400) == bool(alarm)       # RTC_STS: the RTC alarm woke us
    ev = m.step()
    assert (ev.kind, ev.value) == ("debug_exit", 0x53)
    assert m.platform.sleeps == 1


def test_s3_with_several_vcpus_parks_them_and_resumes_the_boot_cpu(guest_vm):
    m = guest_vm("pc_s3.c", machine="pc", vcpus=3)
    r = m.run(timeout=30)
    assert (r.exit, r.exit_code) == ("debug_exit", (0x53 << 1) | 1), r.detail
    stages = [rep.stage for rep in r.reports if rep.kind == "sync"]
    assert stages == [1, 2] and all(rep.vcpu == 0 for rep in r.reports)
    assert m.platform.sleeps == 1
    # the other vCPUs wait for INIT/SIPI again, as after a firmware resume
    assert [v.get_mp_state() for v in m.vcpus[1:]] == [1, 1]     # KVM_MP_STATE_UNINITIALIZED
