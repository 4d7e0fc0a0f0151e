"""Issue 16, fault 2: the port 16550 at 0x3f8 under 16- and 32-bit port accesses, in both run
loops. QEMU's ``serial_io_ops`` has 1-byte registers (``.impl`` max 1, unaligned allowed), so its
memory core turns a wider access into one access per byte at consecutive registers, and
``serial_ioport_read/write`` take the register number mod 8: ``out dx, ax`` at 0x3f8 writes THR
and IER, ``in eax, dx`` at 0x3fc reads MCR, LSR, MSR and SCR."""
import pytest

from _asm import asm16, real_mode_vm
from _loops import LOOP_IDS, LOOPS, pc_config

RAM = 0x10000
OUT = 0x500

BODY = f"""
    mov dx, 0x3ff
    mov al, 0x5a
    out dx, al  # SCR = 0x5a
    mov dx, 0x3fb
    mov ax, 0x0303  # LCR = 3, MCR = 3 (DTR, RTS)
    out dx, ax
    mov dx, 0x3fc
    in eax, dx  # MCR, LSR, MSR, SCR
    mov [{OUT}], eax
    mov dx, 0x3f8
    mov ax, 0x0048  # THR 'H', IER 0
    out dx, ax
    mov eax, 0x00000069  # THR 'i', IER 0, IIR/FCR 0, LCR 0
    out dx, eax
    mov dx, 0x3fa
    in ax, dx  # IIR, LCR
    mov [{OUT + 4}], ax
    mov dx, 0x3ff
    in ax, dx  # SCR, then register 8 mod 8 = RBR
    mov [{OUT + 6}], ax
    hlt
"""


@pytest.mark.parametrize("loop_cls", LOOPS, ids=LOOP_IDS)
def test_wide_port_accesses_reach_consecutive_registers(kvm, loop_cls):
    code = asm16(".org 0x1000\n" + BODY)[0x1000:]
    vm, v = real_mode_vm(kvm, code, RAM, flat_data=True)
    with vm:
        loop = loop_cls(v, pc_config())
        st = loop.run()
        assert st.kind == "exit" and st.exit.name == "HLT"
        got = vm.memory.read(OUT, 8)
    # MCR 3, LSR 0x60 (THR and transmitter empty), MSR 0xb0 (CTS, DSR, DCD), SCR 0x5a
    assert got[:4] == bytes([0x03, 0x60, 0xB0, 0x5A])
    # IIR 0x01 (no interrupt, FIFOs off), LCR 0 (written by the 32-bit out)
    assert got[4:6] == bytes([0x01, 0x00])
    # SCR, then RBR (nothing received: 0)
    assert got[6:8] == bytes([0x5A, 0x00])
    assert bytes(loop.console) == b"Hi"
