"""The run loops' 16550 as Linux's 8250 driver probes and drives it, on this host's KVM: the
loopback test (MSR mirrors MCR), the THR-empty interrupt (IIR 0x02 while IER.THRI, cleared by the
IIR read, raised again by a THR write) delivered on IRQ 4 through the in-kernel irqchip, and one
UART shared by every vCPU of a machine (the C loop and the reference loop alike)."""
import pytest

from pykvm.runloop import UartGroup

from _asm import asm16, real_mode_vcpu
from _loops import LOOP_IDS, LOOPS, pc_config

RAM = 0x10000
OUT = 0x500
EXIT_PORT = 0x501          # nobody serves it: the guest's way back to the test

PROBE = f"""
    mov dx, 0x3fc                   /* MCR: loop | OUT2 | RTS, as the 8250 probe */
    mov al, 0x1a
    out dx, al
    mov dx, 0x3fe
    in al, dx
    mov [{OUT}], al                 /* MSR: DCD | CTS */
    mov dx, 0x3fc
    mov al, 0x15                    /* loop | OUT1 | DTR */
    out dx, al
    mov dx, 0x3fe
    in al, dx
    mov [{OUT + 1}], al             /* MSR: RI | DSR */
    mov dx, 0x3f8
    mov al, 'X'                     /* looped back: not on the console */
    out dx, al
    mov dx, 0x3fc
    mov al, 0x0b                    /* loop off */
    out dx, al
    mov dx, 0x3fe
    in al, dx
    mov [{OUT + 2}], al             /* MSR: DCD, DSR, CTS */
    mov dx, 0x3fa
    in al, dx
    mov [{OUT + 3}], al             /* IIR: nothing pending (IER = 0) */
    mov dx, 0x3f9
    mov al, 0x02                    /* IER.THRI on: THR empty is pending */
    out dx, al
    mov dx, 0x3fa
    in al, dx
    mov [{OUT + 4}], al             /* IIR 0x02 ... */
    in al, dx
    mov [{OUT + 5}], al             /* ... cleared by that read */
    mov dx, 0x3f8
    mov al, 'Y'
    out dx, al
    mov dx, 0x3fa
    in al, dx
    mov [{OUT + 6}], al             /* pending again after a THR write */
    mov dx, 0x3f9
    mov al, 0xff
    out dx, al
    in al, dx
    mov [{OUT + 7}], al             /* IER keeps its low four bits */
    hlt
"""

# PIC remapped to vectors 8-15, only IRQ 4 unmasked; the handler logs IIR, sends one more byte
# twice (each THR write raises the interrupt again), then turns THRI off.
IRQ = f"""
    cli
    xor ax, ax
    mov ss, ax
    mov sp, 0x7000
    mov word ptr [0x30], offset handler     /* IVT entry of vector 0x0c (IRQ 4) */
    mov word ptr [0x32], 0
    mov word ptr [{OUT + 0x20}], 0
    mov al, 0x11
    out 0x20, al
    mov al, 0x08
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xef
    out 0x21, al
    mov dx, 0x3f9
    mov al, 0x02
    out dx, al                      /* IER.THRI: IRQ 4 rises */
wait:
    cli
    cmp word ptr [{OUT + 0x20}], 3
    jae done
    sti
    hlt
    jmp wait
done:
    mov dx, {EXIT_PORT}
    out dx, al
    hlt
handler:
    push ax
    push bx
    push dx
    mov dx, 0x3fa
    in al, dx
    mov bx, [{OUT + 0x20}]
    mov [{OUT} + bx], al
    inc word ptr [{OUT + 0x20}]
    cmp word ptr [{OUT + 0x20}], 3
    jae 1f
    mov dx, 0x3f8
    mov al, 'i'
    out dx, al
    jmp 2f
1:  mov dx, 0x3f9
    xor al, al
    out dx, al
2:  mov al, 0x20
    out 0x20, al
    pop dx
    pop bx
    pop ax
    iret
"""


def _vm(kvm, code, irqchip=False, vcpus=1):
    vm = kvm.create_vm()
    vm.add_memory(0, RAM)
    vm.memory.write(0x1000, code)
    if irqchip:
        vm.create_irqchip()
    out = []
    for _ in range(vcpus):
        out.append(real_mode_vcpu(vm))
    return vm, out


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_uart_passes_the_8250_probe_and_reports_thr_empty(kvm, loop_cls):
    vm, (v,) = _vm(kvm, asm16(".org 0x1000\n" + PROBE)[0x1000:])
    with vm:
        loop = loop_cls(v, pc_config())
        assert loop.run().exit.name == "HLT"
        assert list(vm.memory.read(OUT, 8)) == [0x90, 0x60, 0xB0, 0x01, 0x02, 0x01, 0x02, 0x0F]
        assert bytes(loop.console) == b"Y"


@pytest.mark.requires_cap("IRQCHIP")
@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_uart_thr_empty_interrupt_on_irq4(kvm, loop_cls):
    vm, (v,) = _vm(kvm, asm16(".org 0x1000\n" + IRQ)[0x1000:], irqchip=True)
    with vm:
        loop = loop_cls(v, pc_config(uart_irq=4))
        st = loop.run(deadline=None)
        assert st.kind == "exit" and st.exit.name == "IO" and st.exit.port == EXIT_PORT, st
        assert list(vm.memory.read(OUT, 3)) == [0x02, 0x02, 0x02]     # three interrupts, THRE each
        assert bytes(loop.console) == b"ii"


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_one_uart_for_all_vcpus(kvm, loop_cls):
    # vCPU 0 sets DLAB and IER.THRI; vCPU 1, running afterwards, sees that state
    first = asm16(".org 0x1000\n" + """
        mov dx, 0x3fb
        mov al, 0x80
        out dx, al                  /* LCR.DLAB */
        mov dx, 0x3f8
        mov al, 0x0c
        out dx, al                  /* DLL */
        mov dx, 0x3fb
        mov al, 0x03
        out dx, al
        mov dx, 0x3f9
        mov al, 0x02
        out dx, al                  /* IER.THRI */
        hlt
    """)[0x1000:]
    vm, (v0, v1) = _vm(kvm, first, vcpus=2)
    second = asm16(".org 0x2000\n" + f"""
        mov dx, 0x3fb
        mov al, 0x83
        out dx, al
        mov dx, 0x3f8
        in al, dx
        mov [{OUT}], al             /* DLL as vCPU 0 wrote it */
        mov dx, 0x3fb
        mov al, 0x03
        out dx, al
        mov dx, 0x3fa
        in al, dx
        mov [{OUT + 1}], al         /* THR empty pending from vCPU 0's IER write */
        mov dx, 0x3f8
        mov al, 'Z'
        out dx, al
        hlt
    """)[0x2000:]
    with vm:
        vm.memory.write(0x2000, second)
        r = v1.get_regs()
        r.rip = 0x2000
        v1.set_regs(r)
        group = UartGroup()
        l0 = loop_cls(v0, pc_config(uart_group=group))
        l1 = loop_cls(v1, pc_config(uart_group=group))
        assert l0.run().exit.name == "HLT"
        assert l1.run().exit.name == "HLT"
        assert list(vm.memory.read(OUT, 2)) == [0x0C, 0x02]
        assert bytes(l1.console) == b"Z" and bytes(l0.console) == b""
        # without a group each loop has a UART of its own
        vm2, (w0, w1) = _vm(kvm, first, vcpus=2)
        with vm2:
            vm2.memory.write(0x2000, second)
            r = w1.get_regs()
            r.rip = 0x2000
            w1.set_regs(r)
            assert loop_cls(w0, pc_config()).run().exit.name == "HLT"
            assert loop_cls(w1, pc_config()).run().exit.name == "HLT"
            assert list(vm2.memory.read(OUT, 2)) == [0x00, 0x01]
