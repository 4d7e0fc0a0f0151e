"""Issue 16 (faults 2 and 6): the i8042 controller, PCI configuration access widths and
writable bits, PMBA/PMREGMISC moving the PM block, the RTC keeping the guest's bytes across a
mode switch and multiboot ``mem_lower``, as QEMU 7.2 does them (values observed under QEMU TCG
after SeaBIOS; tests/x86/test_pc_qemu_devices.py runs the same on /dev/kvm and QEMU)."""
import types

from hypothesis import given, settings, strategies as st

from pykvm import boot
from pykvm.devices import i8042, cmos_rtc as rtc
from pykvm.platform.base import MachineControl
from pykvm.platform.pc import PcPlatform
from pykvm.devices.pci_host import PciHost

from device_buses import pio

NS = 1_000_000_000


class Kbc:
    def __init__(self):
        self.resets = 0
        self.irqs = []
        self.k = i8042.I8042(on_reset=self.reset, set_irq=lambda n, lvl: self.irqs.append((n, lvl)))
        self.bus = pio(self.k)

    def reset(self):
        self.resets += 1


def test_i8042_probe_sequence_as_qemu():
    c = Kbc()
    k = c.bus
    assert (k.read(0x64, 1), k.read(0x60, 1)) == (0x1C, 0xFA)
    k.write(0x64, 1, 0xAA)                                  # self test
    assert (k.read(0x64, 1), k.read(0x60, 1), k.read(0x64, 1)) == (0x1D, 0x55, 0x1C)
    k.write(0x64, 1, 0x60)
    k.write(0x60, 1, 0x47)                                  # command byte
    k.write(0x64, 1, 0x20)
    assert k.read(0x60, 1) == 0x47
    assert k.read(0x60, 1) == 0x47                          # an empty buffer repeats
    k.write(0x64, 1, 0xD0)
    assert k.read(0x60, 1) == 0xCF                          # output port: QEMU's reset value
    for cmd, answer in ((0xAB, 0x00), (0xA9, 0x00), (0xC0, 0x80)):
        k.write(0x64, 1, cmd)
        assert k.read(0x60, 1) == answer
    k.write(0x60, 1, 0xFF)                                  # keyboard reset
    assert [k.read(0x60, 1) for _ in range(2)] == [0xFA, 0xAA]
    k.write(0x64, 1, 0xD4)
    k.write(0x60, 1, 0xF2)                                  # mouse identify
    assert k.read(0x64, 1) & 0x21 == 0x21                   # mouse data: MOUSE_OBF
    assert [k.read(0x60, 1) for _ in range(2)] == [0xFA, 0x00]
    assert c.resets == 0


def test_i8042_wide_accesses_are_byte_runs():
    k = Kbc().bus
    assert k.read(0x64, 2) == 0x1C1C and k.read(0x64, 4) == 0x1C1C1C1C
    k.write(0x64, 2, 0xD2 | 0x20 << 8)       # 0xd2, then 0x20 queues the command byte
    k.write(0x64, 1, 0xD2)
    k.write(0x60, 4, 0x44332211)             # 0x11 into the buffer, then 3 unknown keyboard
                                             # commands: each answered 0xFE (resend)
    assert k.read(0x60, 4) == 0xFEFE1161
    assert k.read(0x60, 2) == 0xFEFE         # the last byte repeats once the buffer is empty
    assert k.read(0x62, 1) == 0xFF


def test_i8042_reset_paths():
    for seq in ([(0x64, 0xFE)], [(0x64, 0xF0)], [(0x64, 0xFA)], [(0x64, 0xD1), (0x60, 0xCE)]):
        c = Kbc()
        for port, v in seq:
            c.bus.write(port, 1, v)
        assert c.resets == 1, seq
    for seq in ([(0x64, 0xFF)], [(0x64, 0xF1)], [(0x64, 0xD1), (0x60, 0xCD)]):
        c = Kbc()
        for port, v in seq:
            c.bus.write(port, 1, v)
        assert c.resets == 0, seq
    c = Kbc()
    c.bus.write(0x64, 1, 0xD1)
    c.bus.write(0x60, 1, 0xCD)                                # A20 off: kept, read back
    c.bus.write(0x64, 1, 0xD0)
    assert c.bus.read(0x60, 1) == 0xCD


def test_i8042_irq1_follows_the_buffer_and_command_byte():
    c = Kbc()
    c.bus.write(0x64, 1, 0xAA)
    assert c.irqs == [(1, 1)]
    c.bus.read(0x60, 1)
    assert c.irqs[-1] == (1, 0)
    c.bus.write(0x64, 1, 0x60)
    c.bus.write(0x60, 1, 0x60)                                # KBD_INT off
    c.bus.write(0x64, 1, 0xAA)
    assert c.irqs[-1] == (1, 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x60, 0x61, 0x64, 0x65]), st.sampled_from([1, 2, 4]),
                          st.integers(0, 0xFFFFFFFF), st.booleans()), max_size=80))
def test_i8042_hostile_accesses_never_raise_and_stay_bounded(ops):
    c = Kbc()
    k = c.bus
    for port, size, v, is_write in ops:
        if is_write:
            k.write(port, size, v & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= k.read(port, size) < 1 << (8 * size)
    assert len(c.k.kbd) <= i8042.QUEUE_SIZE and len(c.k.aux) <= i8042.QUEUE_SIZE


# -- PCI --------------------------------------------------------------------------------------

def test_pci_data_port_takes_aligned_accesses_only():
    h = pio(PciHost())
    h.write(0xCF8, 4, 0x80000000)
    assert [h.read(p, 2) for p in range(0xCFC, 0xD00)] == [0x8086, 0, 0x1237, 0]
    assert [h.read(p, 4) for p in range(0xCFC, 0xD00)] == [0x12378086, 0, 0, 0]
    assert [h.read(p, 1) for p in range(0xCFC, 0xD00)] == [0x86, 0x80, 0x37, 0x12]
    h.write(0xCF8, 4, 0x80000804)
    h.write(0xCFD, 2, 0xFFFF)                                # unaligned: dropped
    h.write(0xCFE, 4, 0xFFFFFFFF)
    assert h.read(0xCFC, 4) == 0x02000103
    h.write(0xCF8, 4, 0x80000003)                           # address low bits ORed in
    assert h.read(0xCFC, 2) == 0x0312


def test_pci_address_register_reads_and_reset_control():
    resets = []
    h = pio(PciHost(on_reset=lambda: resets.append(1)))
    h.write(0xCF8, 4, 0x80000807)
    h.write(0xCF8, 1, 0x12)                                 # only a dword write sets it
    assert (h.read(0xCF8, 4), h.read(0xCF8, 1), h.read(0xCFA, 2), h.read(0xCFB, 1)) == \
        (0x80000807, 0x07, 0x0807, 0x07)
    assert h.read(0xCF9, 1) == 0 and h.read(0xCFA, 4) == 0   # unaligned dword: 0
    h.write(0xCF9, 1, 0x02)
    assert h.read(0xCF9, 1) == 0x02 and resets == []
    h.write(0xCF9, 2, 0x0600)                               # the second byte asks for a reset
    assert resets == [1]


def test_pci_read_only_and_writable_bytes_as_qemu():
    h = pio(PciHost())

    def rw(addr, size, value=None, port=0xCFC):
        h.write(0xCF8, 4, 0x80000000 | addr & ~3)
        if value is not None:
            h.write(port, size, value)
        return h.read(port, size)

    assert rw(0x0C, 4, 0xFFFFFFFF) == 0x000000FF           # cache line only; latency RO
    assert rw(0x04, 2, 0xFFFF) == 0x0507                    # command bits QEMU lets through
    assert rw(0x04, 4, 0xFFFF0000) == 0x00000000            # status read-only (no W1C bits)
    assert rw(0x70, 4, 0xFFFFFFFF) == 0xFFFFFFFF            # 0x40-0xff writable (SMRAM too)
    h.write(0xCF8, 4, 0x80000870)
    assert h.read(0xCFC, 4) == 0x00000080                   # PIIX3 MBIRQ0 reset value
    for addr, value in ((0x84C, 0x0003004D), (0x8A0, 0x08), (0x8A8, 0x0F), (0x860, 0x80808080),
                        (0x804, 0x02000103), (0xB04, 0x02800103)):
        h.write(0xCF8, 4, 0x80000000 | addr)
        assert h.read(0xCFC, 4) == value, hex(addr)


def test_smram_reset_value():
    h = pio(PciHost())
    h.write(0xCF8, 4, 0x80000070)
    assert h.read(0xCFE, 1) == 0x02


class _RamStub:
    """Writes only (the ACPI tables)."""
    def write(self, gpa, data):
        pass


def _pc():
    """The PC machine's devices and buses over a VM whose ioctls do nothing (no KVM here)."""
    nop = lambda *a, **k: None                                       # noqa: E731
    vm = types.SimpleNamespace(memory=_RamStub(), set_tss_addr=nop, set_identity_map_addr=nop,
                               add_memory=lambda gpa, size: types.SimpleNamespace(gpa=gpa,
                                                                                  size=size),
                               create_irqchip=nop, set_gsi_routing=nop, create_pit2=nop,
                               reinject_control=nop, irq_line=nop)
    control = MachineControl(console=nop, stopping=lambda: False, kick=nop,
                             in_run=lambda i: False)
    return PcPlatform(vm, None, control, vcpus=1, mem_size=64 << 20)


def test_pmba_and_pmregmisc_move_and_disable_the_pm_block():
    pc = _pc()
    try:
        assert pc.pio.read(0x608, 4) != 0xFFFFFFFF
        pc.pio.write(0xCF8, 4, 0x80000B40)
        pc.pio.write(0xCFC, 4, 0xB000)
        assert pc.pio.read(0xCFC, 4) == 0xB000                # bit 0 writable in QEMU
        assert pc.pio.read(0x608, 4) == 0xFFFFFFFF           # the old ports are dead
        t1 = pc.pio.read(0xB008, 4)
        assert t1 <= 0xFFFFFF and pc.pio.read(0xB004, 2) == 1   # timer; PM1_CNT.SCI_EN
        pc.pio.write(0xB002, 2, 0x0001)                      # PM1_EN.TMR_EN at the new base
        assert pc.pm.en == 1
        pc.pio.write(0xCF8, 4, 0x80000B80)
        pc.pio.write(0xCFC, 1, 0)                            # PMREGMISC: PM I/O off
        assert pc.pio.read(0xB008, 4) == 0xFFFFFFFF
        pc.pio.write(0xCFC, 1, 1)
        assert pc.pio.read(0xB008, 4) != 0xFFFFFFFF
        pc.pio.write(0xCF8, 4, 0x80000B40)
        pc.pio.write(0xCFC, 4, 0x0540)                       # over nothing: base 0x540
        assert pc.pio.read(0x548, 4) != 0xFFFFFFFF
        pc.pio.write(0xCFC, 4, 0x0070)                       # base 0x40 (PIT ports: in-kernel)
        pc.pio.write(0xCFC, 4, 0x0510)                       # base 0x500: fw_cfg keeps 0x510
        assert pc.pio.read(0x510, 1) == ord("Q")
        pc.pio.write(0xCFC, 4, 0xFFFF)                       # 0xffc0: clipped at 0xffff
        assert pc.pio.read(0xFFC8, 4) != 0xFFFFFFFF
    finally:
        pc.close()


def test_i8042_reset_ends_the_run_as_a_reset():
    pc = _pc()
    try:
        pc.pio.write(0x64, 1, 0xFE)
        assert pc.power_event == "reset"
    finally:
        pc.close()


# -- RTC --------------------------------------------------------------------------------------

class Clock:
    def __init__(self, t=1_000 * NS):
        self.t = t

    def __call__(self):
        return self.t


def _time(r):
    return [r.read_register(x) for x in (rtc.HOURS, rtc.MINUTES, rtc.SECONDS)]


def test_rtc_keeps_the_guests_bytes_across_a_dm_switch_under_set():
    clock = Clock()
    r = rtc.CmosRtc(clock=clock, wall_ns=1_750_000_000 * NS)     # 2025-06-15 15:06:40 UTC
    date = [r.read_register(x) for x in (rtc.DAY_OF_MONTH, rtc.MONTH, rtc.YEAR)]
    r.write_register(rtc.REG_B, rtc.B_SET | rtc.B_DM)           # binary, 12-hour, SET
    for reg, v in ((rtc.HOURS, 0x8B), (rtc.MINUTES, 0x3A), (rtc.SECONDS, 0x3A)):
        r.write_register(reg, v)
    r.write_register(rtc.REG_B, rtc.B_DM)
    assert _time(r) == [0x8B, 0x3A, 0x3A]                       # 11:58:58 PM as written
    assert [r.read_register(x) for x in (rtc.DAY_OF_MONTH, rtc.MONTH, rtc.YEAR)] == date
    clock.t += NS
    assert _time(r) == [0x8B, 0x3A, 0x3B]                       # it runs on from there
    clock.t += 61 * NS
    assert _time(r) == [0x0C, 0x00, 0x00]                       # 12:00:00 AM the next day


def test_rtc_invalid_bytes_read_back_until_carried_into():
    clock = Clock()
    r = rtc.CmosRtc(clock=clock, wall_ns=1_750_000_000 * NS)
    r.write_register(rtc.REG_B, rtc.B_SET | rtc.B_24H)          # BCD
    for reg, v in ((rtc.HOURS, 0x12), (rtc.MINUTES, 0x7F), (rtc.SECONDS, 0x30),
                   (rtc.DAY_OF_MONTH, 0x45), (rtc.MONTH, 0x1F)):
        r.write_register(reg, v)
    r.write_register(rtc.REG_B, rtc.B_24H)
    assert _time(r) == [0x12, 0x7F, 0x30]
    assert (r.read_register(rtc.DAY_OF_MONTH), r.read_register(rtc.MONTH)) == (0x45, 0x1F)
    clock.t += NS
    assert _time(r)[1:] == [0x7F, 0x31]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x7F), st.integers(0, 0xFF)), max_size=40))
def test_rtc_any_bytes_under_any_mode_never_raise(writes):
    clock = Clock()
    r = rtc.CmosRtc(clock=clock)
    for reg, v in writes:
        r.write_register(reg, v)
        clock.t += NS // 3
        for x in rtc.TIME_REGS:
            assert 0 <= r.read_register(x) <= 0xFF


# -- multiboot ----------------------------------------------------------------------------------

def test_multiboot_mem_lower_is_the_ram_below_the_ebda():
    info = boot.build_multiboot_info(64 << 20)
    assert int.from_bytes(info[4:8], "little") == 639
    info = boot.build_multiboot_info(64 << 20, memory_map=[(0, 0x9F000, 1),
                                                             (0x100000, 63 << 20, 1)])
    assert int.from_bytes(info[4:8], "little") == 0x9F000 // 1024


def test_i8042_keyboard_answers_as_qemus_ps2_keyboard():
    """QEMU's hw/input/ps2.c: unknown commands are answered 0xFE (resend); 0xF0 0x00 reports the
    scan code set (translated while the controller translates), 0xF0 1-3 selects it."""
    def answers(*cmds):
        k = Kbc().bus
        out = []
        for c in cmds:
            k.write(0x60, 1, c)
            while k.read(0x64, 1) & 1:           # OBF: take what the keyboard answered
                out.append(k.read(0x60, 1))
        return out
    assert answers(0x12) == [0xFE] and answers(0xEF) == [0xFE]
    assert answers(0xF0, 0x00) == [0xFA, 0xFA, 0x41]             # set 2, translated
    assert answers(0xF0, 0x01, 0xF0, 0x00) == [0xFA, 0xFA, 0xFA, 0xFA, 0x43]
    assert answers(0xF0, 0x07) == [0xFA, 0xFE]
    assert answers(0xED, 0x07, 0xF3, 0x20, 0xF4) == [0xFA] * 5
    assert answers(0xFF) == [0xFA, 0xAA] and answers(0xEE) == [0xEE]
    assert answers(0xF2) == [0xFA, 0xAB, 0x41]
