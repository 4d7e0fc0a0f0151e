"""Issue 16, fault 6: the run loops' 16550 in loopback mode (MCR bit 4), driven by a real-mode
guest on this host's KVM through both register windows (x86 ports at 0x3f8, the ns16550a MMIO
window RISC-V uses) and both loops (the C loop and the reference loop, which reach one model: csrc/runloop.c). The expected values follow
the 16550 data sheet and QEMU's serial.c (LSR, RBR, IIR and MSR in loopback were checked by hand
against qemu-system-x86_64 7.2; the character timeout, which QEMU raises 4 character times
after the last byte, is immediate here as the transmitter is): a transmitted byte reaches RBR with LSR.DR and
never the console, overrun sets LSR.OE (cleared by reading LSR), the 16-byte FIFO when FCR enables
it, the received-data and character-timeout interrupts in IIR, and MSR mirroring MCR."""
import pytest

from pykvm.runloop import LoopConfig

from _asm import asm16, real_mode_vm
from _loops import LOOP_IDS, LOOPS, pc_config

RAM = 0x10000
OUT = 0x500             # where the guest stores what it reads
MMIO = 0x20000          # segment 0x2000


def _guest(window: str) -> str:
    """The loopback sequence; each ``R(reg)`` read is stored at the next byte of OUT."""
    lines = []
    n = [0]

    def out(reg, val):
        if window == "port":
            lines.append(f"mov dx, {0x3F8 + reg}\nmov al, {val}\nout dx, al")
        else:
            lines.append(f"mov byte ptr es:[{reg}], {val}")

    def rd(reg):
        if window == "port":
            lines.append(f"mov dx, {0x3F8 + reg}\nin al, dx")
        else:
            lines.append(f"mov al, es:[{reg}]")
        lines.append(f"mov [{OUT + n[0]}], al")
        n[0] += 1

    if window == "mmio":
        lines.append("mov ax, 0x2000\nmov es, ax")
    out(4, 0x10)                  # MCR: loopback
    rd(5); rd(6)                  # 0: LSR 0x60, 1: MSR 0x00
    out(0, 0x41)                  # 'A' to the receiver
    rd(5); rd(2); rd(0); rd(5)    # 2: LSR 0x61, 3: IIR 0x01, 4: RBR 'A', 5: LSR 0x60
    out(0, 0x42); out(0, 0x43)    # FIFOs off: 'C' overruns 'B'
    rd(5); rd(5); rd(0)           # 6: LSR 0x63, 7: LSR 0x61 (OE read-cleared), 8: 'C'
    out(1, 0x01)                  # IER.ERBFI
    out(0, 0x44)
    rd(2); rd(0); rd(2)           # 9: IIR 0x04, 10: 'D', 11: IIR 0x01
    out(2, 0x01)                  # FCR: FIFOs on, trigger level 1
    rd(2)                         # 12: IIR 0xc1
    for i in range(18):           # 18 bytes into a 16-byte FIFO
        out(0, 0x61 + i)
    rd(5); rd(2)                  # 13: LSR 0x63, 14: IIR 0xc4
    for _ in range(16):
        rd(0)                     # 15-30: 'a'..'p'
    rd(5); rd(0)                  # 31: LSR 0x60, 32: empty FIFO reads 0
    out(2, 0xC1)                  # trigger level 14
    out(0, 0x78)
    rd(2); rd(0)                  # 33: IIR 0xcc (timeout below the trigger), 34: 'x'
    out(1, 0x00)
    out(4, 0x1F)                  # loopback with DTR, RTS, OUT1, OUT2
    rd(6)                         # 35: MSR 0xf0
    out(4, 0x03)                  # loopback off: the next byte goes to the console
    out(0, 0x5A)
    rd(5); rd(6)                  # 36: LSR 0x60, 37: MSR 0xb0
    lines.append("hlt")
    return "\n".join(lines)


EXPECT = [0x60, 0x00, 0x61, 0x01, 0x41, 0x60, 0x63, 0x61, 0x43, 0x04, 0x44, 0x01, 0xC1,
          0x63, 0xC4] + list(range(0x61, 0x71)) + [0x60, 0x00, 0xCC, 0x78, 0xF0, 0x60, 0xB0]


@pytest.mark.parametrize("window", ["port", "mmio"])
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_uart_loopback(kvm, loop_cls, window):
    code = asm16(".org 0x1000\n" + _guest(window))[0x1000:]
    vm, v = real_mode_vm(kvm, code, RAM)
    with vm:
        cfg = LoopConfig(uart_mmio_base=MMIO) if window == "mmio" else pc_config()
        loop = loop_cls(v, cfg)
        st = loop.run()
        assert st.kind == "exit" and st.exit.name == "HLT"
        assert list(vm.memory.read(OUT, len(EXPECT))) == EXPECT
        assert bytes(loop.console) == b"Z"          # looped-back bytes never reach it


def test_uart_loopback_rep_insb_pops_each_byte(kvm):
    """A ``rep insb`` from RBR reads the FIFO once per byte in both loops."""
    body = f"""
        mov dx, 0x3fc
        mov al, 0x10
        out dx, al
        mov dx, 0x3fa
        mov al, 0x01
        out dx, al
        mov dx, 0x3f8
        mov al, 0x31
        out dx, al
        inc al
        out dx, al
        inc al
        out dx, al
        mov cx, 4
        mov di, {OUT}
        cld
        rep insb
        hlt
    """
    code = asm16(".org 0x1000\n" + body)[0x1000:]
    for loop_cls in LOOPS:
        vm, v = real_mode_vm(kvm, code, RAM, flat_data=True)
        with vm:
            st = loop_cls(v, pc_config()).run()
            assert st.exit.name == "HLT"
            assert vm.memory.read(OUT, 4) == b"123\0", loop_cls
