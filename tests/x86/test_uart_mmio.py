"""The ns16550a served as MMIO by the run loops (RISC-V's console on QEMU virt), exercised on this
host's KVM: a real-mode guest drives it like a polled driver, at a base it can reach."""
import pytest

from pykvm.runloop import LoopConfig

from _asm import asm16, real_mode_vm
from _loops import LOOP_IDS, LOOPS

UART = 0x20000          # segment 0x2000: reachable from real mode, above the 64 KiB of RAM
RAM = 0x10000
OUT = 0x500             # where the guest stores what it read back

GUEST = f"""
    mov ax, 0x2000
    mov es, ax
    mov byte ptr es:[7], 0x5a       /* scratch */
    mov al, es:[7]
    mov [{OUT}], al
    mov al, es:[5]                  /* LSR: THRE | TEMT */
    mov [{OUT + 1}], al
    mov byte ptr es:[3], 0x80       /* LCR.DLAB: the divisor latch */
    mov byte ptr es:[0], 0x0c
    mov byte ptr es:[1], 0x01
    mov al, es:[0]
    mov [{OUT + 2}], al
    mov al, es:[1]
    mov [{OUT + 3}], al
    mov byte ptr es:[3], 0x03       /* 8N1, DLAB off */
    mov al, es:[3]
    mov [{OUT + 4}], al
    mov al, es:[2]                  /* IIR: no interrupt pending */
    mov [{OUT + 5}], al
    mov byte ptr es:[1], 0x00       /* IER */
    mov al, es:[1]
    mov [{OUT + 6}], al
    mov al, es:[6]                  /* MSR: DCD, DSR, CTS */
    mov [{OUT + 7}], al
    mov byte ptr es:[2], 0x07       /* FCR: FIFOs on, IIR bits 7:6 say so (QEMU: 0xc1) */
    mov al, es:[2]
    mov [{OUT + 8}], al
    mov si, offset msg
1:  mov al, es:[5]
    test al, 0x20
    jz 1b
    mov al, [si]
    test al, al
    jz 2f
    mov es:[0], al
    inc si
    jmp 1b
2:  mov eax, es:[0x1]               /* a wide read of IER: the register in the low byte */
    mov [{OUT + 9}], eax
    mov al, es:[0x10]               /* past the eighth register: not the UART's */
    hlt
msg: .asciz "ns16550a over MMIO\\n"
"""


def _vm(kvm, code):
    return real_mode_vm(kvm, code, RAM)


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_mmio_uart_polled_driver(kvm, loop_cls):
    code = asm16(".org 0x1000\n" + GUEST)[0x1000:]
    vm, v = _vm(kvm, code)
    with vm:
        loop = loop_cls(v, LoopConfig(uart_mmio_base=UART))
        st = loop.run()
        # the read past the UART's registers reaches the caller as an MMIO exit
        assert st.kind == "exit" and st.exit.name == "MMIO"
        assert st.exit.phys_addr == UART + 0x10 and not st.exit.is_write
        st.exit.respond(0)
        assert bytes(loop.console) == b"ns16550a over MMIO\n"
        got = vm.memory.read(OUT, 13)
        assert list(got[:9]) == [0x5A, 0x60, 0x0C, 0x01, 0x03, 0x01, 0x00, 0xB0, 0xC1]
        assert int.from_bytes(got[9:13], "little") == 0      # IER (0) and zeroes above
        if loop.native:
            assert loop.handled_in_c == loop.exits_total - 1
        assert loop.run().exit.name == "HLT"


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_mmio_uart_off_by_default(kvm, loop_cls):
    vm, v = _vm(kvm, asm16(".org 0x1000\n" + GUEST)[0x1000:])
    with vm:
        st = loop_cls(v).run()
        assert st.kind == "exit" and st.exit.name == "MMIO" and st.exit.phys_addr == UART + 7


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_mmio_uart_register_stride(kvm, loop_cls):
    # reg-shift 2 (registers 4 bytes apart): THR at +0, LSR at +20; +1 is between registers
    code = asm16(".org 0x1000\n" + """
        mov ax, 0x2000
        mov es, ax
        mov al, es:[20]
        mov [0x500], al
        mov byte ptr es:[0], 0x41
        mov byte ptr es:[28], 0x77     /* scratch at 7 << 2 */
        mov al, es:[28]
        mov [0x501], al
        mov al, es:[1]
        hlt
    """)[0x1000:]
    vm, v = _vm(kvm, code)
    with vm:
        loop = loop_cls(v, LoopConfig(uart_mmio_base=UART, uart_mmio_shift=2))
        st = loop.run()
        assert st.kind == "exit" and st.exit.name == "MMIO" and st.exit.phys_addr == UART + 1
        assert bytes(loop.console) == b"A"
        assert list(vm.memory.read(0x500, 2)) == [0x60, 0x77]
