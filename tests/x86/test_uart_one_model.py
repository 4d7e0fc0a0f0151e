"""Issue 17: one 16550 model. The C loop, the reference loop and Python code (a
pykvm.devices.uart16550.Uart16550) all reach the same UART state (csrc/runloop.c), so a
machine whose vCPUs run different loops still has one UART; and a LoopConfig serves no port
unless a platform names it (the loop knows no PC)."""
import pytest

from pykvm.devices.uart16550 import Uart16550
from pykvm.runloop import LoopConfig, RunLoop, UartGroup
from pykvm.testing.reference_loop import ReferenceLoop

from _asm import asm16, real_mode_vcpu
from _loops import LOOP_IDS, LOOPS, pc_config

RAM = 0x10000
OUT = 0x500

# vCPU 0: DLL = 0x0c (through DLAB), SCR = 0x5a, 'A' out, halt
FIRST = """
    mov dx, 0x3fb
    mov al, 0x80
    out dx, al
    mov dx, 0x3f8
    mov al, 0x0c
    out dx, al
    mov dx, 0x3fb
    mov al, 0x03
    out dx, al
    mov dx, 0x3ff
    mov al, 0x5a
    out dx, al
    mov dx, 0x3f8
    mov al, 'A'
    out dx, al
    hlt
"""
# vCPU 1: read DLL and SCR as vCPU 0 (or Python) left them, 'B' out, halt
SECOND = f"""
    mov dx, 0x3fb
    mov al, 0x83
    out dx, al
    mov dx, 0x3f8
    in al, dx
    mov [{OUT}], al
    mov dx, 0x3fb
    mov al, 0x03
    out dx, al
    mov dx, 0x3ff
    in al, dx
    mov [{OUT + 1}], al
    mov dx, 0x3f8
    mov al, 'B'
    out dx, al
    hlt
"""


def _two_vcpus(kvm):
    vm = kvm.create_vm()
    vm.add_memory(0, RAM)
    vm.memory.write(0x1000, asm16(".org 0x1000\n" + FIRST)[0x1000:])
    vm.memory.write(0x2000, asm16(".org 0x2000\n" + SECOND)[0x2000:])
    v0 = real_mode_vcpu(vm)
    v1 = real_mode_vcpu(vm)
    r = v1.get_regs()
    r.rip = 0x2000
    v1.set_regs(r)
    return vm, v0, v1


@pytest.mark.parametrize("first, second", [(RunLoop, ReferenceLoop), (ReferenceLoop, RunLoop)],
                         ids=["c-then-py", "py-then-c"])
def test_a_c_loop_and_the_reference_loop_share_one_uart(kvm, first, second):
    vm, v0, v1 = _two_vcpus(kvm)
    with vm:
        group = UartGroup()
        l0 = first(v0, pc_config(uart_group=group))
        l1 = second(v1, pc_config(uart_group=group))
        assert l0.run().exit.name == "HLT"
        assert l1.run().exit.name == "HLT"
        assert list(vm.memory.read(OUT, 2)) == [0x0C, 0x5A]
        assert l0.console + l1.console == b"AB"


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_python_reaches_the_uart_the_guest_drives(kvm, loop_cls):
    vm, v0, v1 = _two_vcpus(kvm)
    with vm:
        group = UartGroup()
        uart = Uart16550(group)
        l0 = loop_cls(v0, pc_config(uart_group=group))
        assert l0.run().exit.name == "HLT"
        assert l0.console == b"A"
        assert uart.read(7, 1) == 0x5A                 # SCR as the guest wrote it
        uart.write(7, 1, 0x33)                         # and Python's write reaches the guest
        uart.write(0, 1, ord("p"))
        l1 = loop_cls(v1, pc_config(uart_group=group))
        assert l1.run().exit.name == "HLT"
        assert list(vm.memory.read(OUT, 2)) == [0x0C, 0x33]
        assert l1.console + uart.take() == b"pB"      # one output, in write order


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_a_default_config_serves_no_port(kvm, loop_cls):
    code = asm16(".org 0x1000\n" + """
        mov al, 0x41
        mov dx, 0x3f8
        out dx, al
        out 0xe9, al
        out 0xf4, al
        hlt
    """)[0x1000:]
    vm = kvm.create_vm()
    vm.add_memory(0, RAM)
    vm.memory.write(0x1000, code)
    v = real_mode_vcpu(vm)
    with vm:
        loop = loop_cls(v, LoopConfig())
        ports = []
        for _ in range(3):
            st = loop.run()
            assert st.kind == "exit" and st.exit.name == "IO"
            ports.append(st.exit.port)
        assert ports == [0x3F8, 0xE9, 0xF4] and loop.console == b""
        assert loop.run().exit.name == "HLT"
